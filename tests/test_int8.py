"""The INT8 export's gate: a model made to quantize badly (one activation channel 10⁴ times the
others, so one int8 range per tensor leaves the others no resolution) loses its accuracy, and
the gate stops the stage in one line, or keeps the FP32 model only."""
import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.errors import UserError
from pipeline.export import int8
from pipeline.export.onnx import export_onnx, onnx_logits


class Outlier(nn.Module):
    """Tells a bright image from a dark one through 8 hidden channels; channel 0 carries nothing
    the head uses but is 10⁴ times larger than the rest."""

    def __init__(self, outlier: float):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        with torch.no_grad():
            self.conv.weight.fill_(0.1)
            self.conv.bias.zero_()
            self.conv.weight[0] *= outlier
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0] + [-1.0] * 7, [0.0] + [1.0] * 7]))
            self.head.bias.copy_(torch.tensor([0.7, -0.7]))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def data(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (rng.random((n, 3, 8, 8)) * 0.5 + y[:, None, None, None] * 0.5).astype(np.float32)
    return x, y


@pytest.mark.parametrize("outlier, loses", [(1.0, False), (1e4, True)])
def test_the_gate_fires_on_a_model_made_to_quantize_badly(tmp_path, outlier, loses):
    model = Outlier(outlier).eval()
    x, y = data()
    export_onnx(model, 8, tmp_path / "fp32.onnx")
    int8.quantize(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", data(64, seed=1)[0])
    result = int8.compare(onnx_logits(tmp_path / "fp32.onnx", x), onnx_logits(tmp_path / "int8.onnx", x), y)
    assert result["fp32_accuracy"] == 1.0
    if not loses:
        assert result["int8_accuracy"] == 1.0 and int8.gate(result, 0.01, "fail")
        return
    assert result["int8_accuracy_drop"] > 0.3, result  # the small channels are quantized to nothing
    with pytest.raises(UserError, match="INT8 export loses .* more than export.int8_max_drop=0.01; raise"):
        int8.gate(result, 0.01, "fail")
    assert int8.gate(result, 0.01, "keep_fp32") is False


def test_quantizing_is_the_same_bytes_twice(tmp_path):
    export_onnx(Outlier(1.0).eval(), 8, tmp_path / "fp32.onnx")
    calib = data(64, seed=1)[0]
    int8.quantize(tmp_path / "fp32.onnx", tmp_path / "a.onnx", calib)
    int8.quantize(tmp_path / "fp32.onnx", tmp_path / "b.onnx", calib)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_multilabel_models_int8_check_is_by_map():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    good = np.array([[3.0, -3.0], [-3.0, 3.0], [3.0, 3.0], [-3.0, -3.0]])
    bad = -good
    same = int8.compare(good, good + 0.01, y, np.array([0.5, 0.5]))
    assert same["int8_accuracy"] == same["fp32_accuracy"] == 1.0 and same["int8_top1_agreement"] == 1.0
    worse = int8.compare(good, bad, y, np.array([0.5, 0.5]))
    assert worse["int8_accuracy_drop"] > 0.3 and worse["int8_top1_agreement"] == 0.0


class SamePadding(nn.Module):
    """TensorFlow-style "same" padded, strided convolutions (as in timm's tf_* models): their
    padding is computed from the input's shape inside the graph. Returns the feature map."""

    def __init__(self):
        super().__init__()
        from timm.layers import create_conv2d

        torch.manual_seed(0)
        self.conv1 = create_conv2d(3, 8, 3, stride=2, padding="same")
        self.conv2 = create_conv2d(8, 8, 5, stride=2, padding="same", depthwise=True)

    def forward(self, x):
        return torch.clamp(self.conv2(torch.clamp(self.conv1(x), 0, 6)), 0, 6)


def test_a_shape_computed_padding_stays_float_and_the_int8_model_matches(tmp_path):
    # with the padding's arithmetic quantized too, the pads came out as 0: a 3×3 map instead of 4×4
    export_onnx(SamePadding().eval(), 16, tmp_path / "fp32.onnx")
    skipped = int8.shape_nodes(tmp_path / "fp32.onnx")
    assert any("Shape" in name for name in skipped) and not any("Conv" in name for name in skipped)
    x = np.random.default_rng(0).random((64, 3, 16, 16)).astype(np.float32)
    int8.quantize(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", x[:32])
    fp32, q8 = onnx_logits(tmp_path / "fp32.onnx", x), onnx_logits(tmp_path / "int8.onnx", x)
    assert fp32.shape == q8.shape == (64, 8, 4, 4)
    assert np.linalg.norm(q8 - fp32) / np.linalg.norm(fp32) < 0.05
