"""The modules every stage imports: params (validated at the edge), paths, io, errors, secrets,
preprocess, images, and warm and processes (how a stage runs). One directory, so that each stage
in dvc.yaml depends on it as one entry (dvc.lock stays small: DVC rewrites it after every stage).
Imports nothing itself: `python -m pipeline.core.warm` must not import the stages' code."""
