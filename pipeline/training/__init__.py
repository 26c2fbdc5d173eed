"""Stage `train`: the training loop (`loop`), its recipe (`recipe`), per-sample augmentation
(`augment`), transfer strategies (`transfer`) and the cached-feature linear probe (`probe`),
`lr: auto` and the range test (`lr`), DDP (`distributed`), and the stage's work (`run`)."""
