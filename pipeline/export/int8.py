"""INT8 export (`export.int8`): the FP32 ONNX model quantized statically with ONNX Runtime
(`quantize_static`: QDQ format, per-channel 8-bit weights, unsigned 8-bit activations whose
ranges are calibrated on training images, MinMax; signed weights first, unsigned ones when the
signed lose more than `export.int8_max_drop` on the validation split: see `quantize`), then
checked the way the FP32 export is: top-1 agreement with the FP32 model and accuracy on the
whole test split, batch-1 and batch-32 latency, file size. A gate: when the INT8 model's test accuracy is more than
`export.int8_max_drop` below the FP32 model's, the stage stops with one line
(`export.int8_on_drop: fail`) or keeps the FP32 model only (`keep_fp32`).

The INT8 files live in models/int8/ (`model.onnx` and its card `model.json`), a folder DVC
tracks whatever the params say: with `export.int8: false` (or a refused model) it holds only a
note saying why, as DVC outputs must exist.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError

NOTE = "README.txt"  # models/int8/ without an INT8 model: why


WEIGHT_TYPES = ("int8", "uint8")  # tried in this order: the first whose validation accuracy holds is kept


def quantize(fp32: Path, out: Path, calibration: np.ndarray, weights: str = "int8", batch: int = 32) -> None:
    """Write the INT8 model of `fp32` to `out`: `weights` 8-bit signed or unsigned per-channel
    weights, unsigned 8-bit activations whose ranges are calibrated on the normalised float32
    images `calibration` (N×3×S×S).

    Signed weights (ONNX Runtime's default) ran faster than FP32 (tf_efficientnet_lite0, 128 px,
    2-core Xeon with VNNI, batch 1: 2.0 ms against 2.4 ms) and lost 0.75 points of a CIFAR-10
    linear probe's accuracy; unsigned weights lost none but ran 5.5× slower there (ONNX Runtime's
    fast integer path takes signed weights). Hence the order of WEIGHT_TYPES."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([calibration[i:i + batch] for i in range(0, len(calibration), batch)])

        def get_next(self):
            nxt = next(self.batches, None)
            return None if nxt is None else {"images": nxt}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # shapes and folding, as ORT advises
        quantize_static(str(prepared), str(out), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8,
                        nodes_to_exclude=shape_nodes(prepared))


def shape_nodes(path: Path) -> list[str]:
    """The nodes that compute on tensor shapes alone: a Shape op and what derives from its outputs
    (and constants) only. They stay in float: ONNX Runtime's quantizer otherwise puts its
    Quantize/Dequantize pairs on them too, and a TensorFlow-style "same" padding (timm's tf_*
    models, computed from the input's shape) came out wrong: a linear probe on
    tf_efficientnet_lite0 lost 6.4 points of CIFAR-10 accuracy with them quantized, none without."""
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {t.name for t in graph.initializer}
    derived: set[str] = set()
    names = []
    for node in graph.node:  # in topological order
        inputs = [i for i in node.input if i and i not in constants]
        if node.op_type in ("Shape", "Constant") or (inputs and all(i in derived for i in inputs)):
            derived.update(node.output)
            names.append(node.name)
    return names


def calibration_images(x_train: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` training images (a seeded pick, in index order) as stored: the INT8 calibration set."""
    pick = np.sort(np.random.default_rng(seed).permutation(len(x_train))[:n])
    return np.asarray(x_train[pick])


def compare(fp32_logits: np.ndarray, int8_logits: np.ndarray, y: np.ndarray,
            thresholds: np.ndarray | None = None) -> dict:
    """Top-1 agreement and test accuracy of both models, and the drop. Multi-label (k-hot `y`,
    the labels' `thresholds` on sigmoid(logits)): the macro mAP stands for the accuracy, and the
    agreement is the share of image × label decisions both make alike."""
    if thresholds is not None:
        from pipeline.evaluation.multilabel import average_precisions
        from pipeline.probabilities import sigmoid

        p32, p8 = sigmoid(fp32_logits), sigmoid(int8_logits)
        fp32_acc, int8_acc = (float(np.nanmean(average_precisions(y, p))) for p in (p32, p8))
        agree = float(((p32 >= thresholds) == (p8 >= thresholds)).mean())
    else:
        fp32_acc, int8_acc = float((fp32_logits.argmax(1) == y).mean()), float((int8_logits.argmax(1) == y).mean())
        agree = float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean())
    return {"int8_top1_agreement": agree, "int8_accuracy": int8_acc, "fp32_accuracy": fp32_acc,
            "int8_accuracy_drop": fp32_acc - int8_acc}


def gate(result: dict, max_drop: float, on_drop: str) -> bool:
    """True when the INT8 model is kept; a UserError when it lost too much and `on_drop` is fail."""
    if result["int8_accuracy_drop"] <= max_drop:
        return True
    what = (f"INT8 export loses {result['int8_accuracy_drop']:.2%} test accuracy ({result['fp32_accuracy']:.4f} → "
            f"{result['int8_accuracy']:.4f}), more than export.int8_max_drop={max_drop:g}")
    if on_drop == "fail":
        raise UserError(f"{what}; raise export.int8_max_drop, set export.int8_on_drop: keep_fp32, or export.int8: false")
    print(f"export: {what}: keeping the FP32 model only (export.int8_on_drop: keep_fp32)", flush=True)
    return False


def note(folder: Path, text: str) -> None:
    (folder / NOTE).write_text(text.rstrip() + "\n")
