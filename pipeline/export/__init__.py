"""Stage `export` (`onnx`, the stage's work in `run`) and `pipeline predict` (`predict`): the
exported model and what uses it."""
