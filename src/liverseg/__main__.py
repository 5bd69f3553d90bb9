"""`python -m liverseg ...`: the CLI where the package is on PYTHONPATH but not installed."""

from liverseg.cli import main

main()
