"""Stage `train`: the training loop (`loop`), its recipe (`recipe`), per-sample augmentation
(`augment`), the run's transfer strategy (`strategy`) and the parameters it trains (`transfer`),
the cached-feature linear probe (`probe`), the lr range test (`lr`), DDP (`distributed`), and
the stage's work (`run`)."""
