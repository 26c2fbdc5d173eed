"""Command line: `python -m pipeline {summary,models,predict,lr-find,tune,ensemble,runs,params} ...`
(also installed as `pipeline`; `--help` says what each does)."""
from pipeline.cli import main

main()
