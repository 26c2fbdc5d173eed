"""Stage `evaluate`: test-split metrics (`metrics`), Grad-CAM (`gradcam`), pictures
(`figures`), the one-page report (`report`), and the stage's work (`run`)."""
