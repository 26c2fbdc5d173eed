"""What the export stage does: models/model.onnx from the checkpoint (its logits divided by the
checkpoint's temperature, so softmax gives calibrated probabilities), checked against PyTorch
with ONNX Runtime on the whole test split, and its latency (the report stage logs the model to
MLflow and registers it)."""
import numpy as np
import torch

from pipeline import paths
from pipeline.checkpoint import calibrated, is_multilabel, load_checkpoint, predict_logits, preprocessing
from pipeline.export.onnx import (
    batch1_latency,
    check_parity,
    WithProbabilities,
    export_onnx,
    model_card,
    onnx_logits,
    onnx_metadata,
    parity,
)
from pipeline.io import atomic_path, write_json
from pipeline.prepared import load_split


def run(conformal_alpha: float = 0.0) -> dict:
    """Export models/model.pt to ONNX, check it, time it; return the metrics. `conformal_alpha`:
    the level of the prediction sets whose threshold the card carries (0: none)."""
    raw, ckpt = load_checkpoint(paths.CHECKPOINT)
    model = calibrated(raw, ckpt)  # logits / T: the exported model's softmax is calibrated
    card, prep = model_card(ckpt, conformal_alpha), preprocessing(ckpt)
    x, _ = load_split("test", paths.PREPARED_DIR)
    x_float = prep.model_input(torch.from_numpy(np.array(x))).numpy()
    with atomic_path(paths.ONNX_MODEL) as tmp:
        labels = is_multilabel(ckpt)  # then the graph gives each label's probability too
        exporter = export_onnx(WithProbabilities(model) if labels else model, prep.image_size, tmp, onnx_metadata(card),
                               ("logits", "probabilities") if labels else ("logits",))
        ort_logits = onnx_logits(tmp, x_float)
        metrics = parity(predict_logits(model, x, prep), ort_logits)
        check_parity(metrics)
        timing = batch1_latency(model, tmp, x_float[:1])
        write_json(paths.ONNX_META, card)
    metrics |= {"onnx_bytes": paths.ONNX_MODEL.stat().st_size, "exporter": exporter}
    write_json(paths.EXPORT_METRICS, metrics)  # the same for the same model
    write_json(paths.EXPORT_TIMING, timing)    # latencies vary run to run: not a DVC output
    result = metrics | timing
    print(f"export: {paths.ONNX_MODEL} ({result['onnx_bytes'] / 1e6:.2f} MB, {exporter} exporter); top-1 agreement "
          f"{result['top1_agreement']:.2%}, max |logit diff| {result['max_abs_logit_diff']:.2e} "
          f"on {result['n_checked']} test images; batch-1 CPU latency p50 torch "
          f"{result['torch_latency_ms_p50']:.2f} ms, ONNX Runtime {result['onnx_latency_ms_p50']:.2f} ms")
    return result
