"""Command line: `python -m pipeline {summary,models} ...` (also installed as `pipeline`)."""
from pipeline.cli import main

main()
