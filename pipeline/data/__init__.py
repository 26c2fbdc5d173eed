"""Stages `download` and `prepare`: data sets (`registry`: digits, the torchvision sets, your
folders) → decoded once, resized, split and written as the prepared arrays (`prepare`), with a
manifest, duplicates and the data card (`card`)."""
