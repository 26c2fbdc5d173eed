"""A declarative, reproducible image-classification pipeline (library behind `stages/`)."""

__version__ = "0.1.0"
