"""`python -m lidit <verb>`: see lidit.cli."""
from .cli import main

main()
