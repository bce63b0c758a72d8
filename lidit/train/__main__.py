"""`python -m lidit.train` and `torchrun ... -m lidit.train`: the same as `python -m lidit train`."""
from .cli import main

main()
