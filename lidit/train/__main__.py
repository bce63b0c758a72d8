"""`python -m lidit.train` and `torchrun ... -m lidit.train`."""
from .loop import main

main()
