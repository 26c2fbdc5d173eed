"""What the export stage does: models/model.onnx from the checkpoint (its logits divided by the
checkpoint's temperature, so softmax gives calibrated probabilities), checked against PyTorch
with ONNX Runtime on test images (up to PARITY_IMAGES of them), and its latency (the report stage logs the model to
MLflow and registers it)."""
import numpy as np
import torch

from pipeline.checkpoint import calibrated, is_multilabel, load_checkpoint, predict_logits, preprocessing
from pipeline.core import paths
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
from pipeline.core.io import atomic_dir, atomic_path, write_json
from pipeline.core.params import ExportParams
from pipeline.export.runtime import CPU
from pipeline.prepared import load_split

# Test images the ONNX check runs on: all of a small test split, else this many evenly spaced (a
# wrong op shows on every image; on 10,000 CIFAR-10 images at 224 px the check would take minutes).
# Both engines take ~1.5 ms an image at 64 px on 2 cores: 512 images cost 0.6 s more than 300
# (digits' 270 test images are all checked).
PARITY_IMAGES = 300


def parity_subset(n: int) -> np.ndarray:
    """Indices of the test images the ONNX check runs on: all n, or PARITY_IMAGES evenly spaced."""
    return np.arange(n) if n <= PARITY_IMAGES else np.linspace(0, n - 1, PARITY_IMAGES).round().astype(int)


def run(conformal_alpha: float = 0.0, export: ExportParams = ExportParams()) -> dict:
    """Export models/model.pt to ONNX, check it, time it; return the metrics. `conformal_alpha`:
    the level of the prediction sets whose threshold the card carries (0: none); `export`: the
    INT8 model's params (models/int8/)."""
    raw, ckpt = load_checkpoint(paths.CHECKPOINT)
    model = calibrated(raw, ckpt)  # logits / T: the exported model's softmax is calibrated
    card, prep = model_card(ckpt, conformal_alpha), preprocessing(ckpt)
    x, _ = load_split("test", paths.PREPARED_DIR)
    checked = parity_subset(len(x))
    sample = x[checked]
    judged = x if export.int8 else sample  # an INT8 model is judged on every test image
    x_float = prep.model_input(torch.from_numpy(np.array(judged))).numpy()
    with atomic_path(paths.ONNX_MODEL) as tmp:
        labels = is_multilabel(ckpt)  # then the graph gives each label's probability too
        exporter = export_onnx(WithProbabilities(model) if labels else model, prep.image_size, tmp, onnx_metadata(card),
                               ("logits", "probabilities") if labels else ("logits",))
        ort_logits = onnx_logits(tmp, x_float)
        metrics = parity(predict_logits(model, sample, prep), ort_logits[checked] if export.int8 else ort_logits)
        check_parity(metrics)
        timing = batch1_latency(model, tmp, x_float[:1])
        write_json(paths.ONNX_META, card)
    metrics |= {"onnx_bytes": paths.ONNX_MODEL.stat().st_size, "exporter": exporter}
    print(f"export: {paths.ONNX_MODEL} ({metrics['onnx_bytes'] / 1e6:.2f} MB, {exporter} exporter); top-1 agreement "
          f"{metrics['top1_agreement']:.2%}, max |logit diff| {metrics['max_abs_logit_diff']:.2e} "
          f"on {metrics['n_checked']} test images; batch-1 CPU latency p50 torch "
          f"{timing['torch_latency_ms_p50']:.2f} ms, ONNX Runtime {timing['onnx_latency_ms_p50']:.2f} ms", flush=True)
    int8_metrics, int8_timing = export_int8(export, card, prep, x_float, ort_logits)  # then the INT8 model's line
    metrics |= int8_metrics
    timing |= int8_timing
    write_json(paths.EXPORT_METRICS, metrics)  # the same for the same model
    write_json(paths.EXPORT_TIMING, timing)    # latencies vary run to run: not a DVC output
    return metrics | timing


def export_int8(export: ExportParams, card: dict, prep, x_test: np.ndarray, fp32_logits: np.ndarray) -> tuple[dict, dict]:
    """models/int8/: the INT8 model and its card, checked and gated (`pipeline.export.int8`), or a
    note saying why there is none. Returns (metrics: the same for the same model; timings)."""
    from pipeline.export import int8
    from pipeline.export.onnx import _with_metadata, latency_ms, onnx_session

    with atomic_dir(paths.INT8_DIR) as tmp:
        if not export.int8:
            int8.note(tmp, "No INT8 model: export.int8: false (dvc exp run -S export.int8=true makes one here).")
            return {}, {}
        path = tmp / "model.onnx"
        thresholds = np.asarray(card["thresholds"]) if card.get("task") == "multilabel" else None  # mAP instead
        weights = _quantized(path, prep, export.int8_calibration_images, export.int8_max_drop, thresholds)
        card = card | {"precision": "int8", "int8_weights": weights}
        _with_metadata(path, onnx_metadata(card), replace=True)
        result = int8.compare(fp32_logits, onnx_logits(path, x_test), load_split("test", paths.PREPARED_DIR)[1],
                              thresholds)
        result |= {"int8_bytes": path.stat().st_size, "int8_weights": weights}
        if not int8.gate(result, export.int8_max_drop, export.int8_on_drop):
            path.unlink()
            int8.note(tmp, f"No INT8 model: it lost {result['int8_accuracy_drop']:.2%} test accuracy, more than "
                      f"export.int8_max_drop={export.int8_max_drop:g} (export.int8_on_drop: keep_fp32).")
            return result | {"int8_kept": False}, {}
        write_json(tmp / "model.json", card)
        timing = {}
        for name, model in (("fp32", paths.ONNX_MODEL), ("int8", path)):
            sess = onnx_session(model, [CPU])
            for batch in (1, 32):
                xb = x_test[:batch] if len(x_test) >= batch else np.repeat(x_test[:1], batch, axis=0)
                timing[f"{name}_latency_ms_batch{batch}"] = latency_ms(lambda: sess.run(None, {"images": xb}))["p50"]
    print(f"export: {paths.INT8_DIR / 'model.onnx'} ({result['int8_bytes'] / 1e6:.2f} MB, FP32 "
          f"{paths.ONNX_MODEL.stat().st_size / 1e6:.2f} MB): test accuracy {result['int8_accuracy']:.4f} against FP32 "
          f"{result['fp32_accuracy']:.4f}, top-1 agreement {result['int8_top1_agreement']:.2%}; batch-32 latency "
          f"{timing['int8_latency_ms_batch32']:.1f} ms against {timing['fp32_latency_ms_batch32']:.1f} ms", flush=True)
    return result | {"int8_kept": True}, timing


def _quantized(path, prep, n_calibration: int, max_drop: float, thresholds) -> str:
    """Write the INT8 model to `path`, its weights of the first of `int8.WEIGHT_TYPES` whose accuracy
    on the validation split is within `max_drop` of the FP32 model's (else of the one that lost
    least): chosen on validation, so that the test split still judges it. Returns the weights' type."""
    from pipeline.export import int8

    x_train, _ = load_split("train", paths.PREPARED_DIR)
    calib = prep.model_input(torch.from_numpy(int8.calibration_images(x_train, n_calibration))).numpy()
    x_val, y_val = load_split("val", paths.PREPARED_DIR)
    x_val = prep.model_input(torch.from_numpy(np.array(x_val))).numpy()
    fp32_val, drops = onnx_logits(paths.ONNX_MODEL, x_val), {}
    for weights in int8.WEIGHT_TYPES:
        int8.quantize(paths.ONNX_MODEL, path.with_name(weights + ".onnx"), calib, weights)
        drops[weights] = int8.compare(fp32_val, onnx_logits(path.with_name(weights + ".onnx"), x_val), y_val,
                                      thresholds)["int8_accuracy_drop"]
        if drops[weights] <= max_drop:
            break
    best = next((w for w, d in drops.items() if d <= max_drop), min(drops, key=drops.get))
    path.with_name(best + ".onnx").replace(path)
    for weights in drops.keys() - {best}:
        path.with_name(weights + ".onnx").unlink()
    return best
