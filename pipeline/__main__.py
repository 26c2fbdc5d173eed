"""Command line: `python -m pipeline {summary,models,predict} ...` (also installed as `pipeline`)."""
from pipeline.cli import main

main()
