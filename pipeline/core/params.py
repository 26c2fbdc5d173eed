"""params.yaml → typed, validated objects, at the edge; and the one definition of every key.

The `Params` model below holds each key's default, its bounds and choices, and what it means
(its `description`): params.yaml is rendered from it (`python -m pipeline params --write`,
pipeline/params_doc.py), so a default or a comment is written once, here.

Every stage calls `load_params(stage="<name>")` first. The whole file is validated (unknown
key, wrong type, value out of range: `UserError`, one line naming the key, the bad value and
what is allowed), and the stage gets a view that holds only the keys of its `params:` in
dvc.yaml (`stage_keys`): reading any other key is an error, so a stage cannot depend on a
param DVC does not know it depends on. Model names are checked against the registry (which
imports torch and timm, seconds) only where `model` is read.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.preprocess import MIN_IMAGE_SIZE, RESIZE_POLICIES, TTA_MODES  # Literal[TTA_MODES]: any of them
from pipeline.core.secrets import password_problem, redact
from pipeline.data.registry import DATASETS, display_name

MAX_IMAGE_SIZE = 1024  # pixels
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_FOLDS = 100


def _check_models(info: ValidationInfo) -> bool:
    return not (info.context or {}).get("skip_models", False)


def choices(model: type[BaseModel], field: str) -> tuple[Any, ...]:
    """The values a Literal field allows (`choices(TuneParams, "sampler")`), for a command-line
    option that offers the same choices as the param."""
    return get_args(model.model_fields[field].annotation)


def _auto_or(field: str, usage: str):
    """A validator for an `auto | number` field: pydantic reports one error per branch of the
    union, the first ("Input should be 'auto'") hiding the number's. A number gets the number's
    own error (its bounds are the Field's), anything else `use auto or <usage>`."""
    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            if type(value) in (int, float):  # not bool
                raise ValueError(exc.errors()[-1]["msg"]) from None
            raise ValueError(f"use auto or {usage}") from None
    return field_validator(field, mode="wrap")(classmethod(lambda cls, v, handler: check(v, handler)))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)  # .inf, .nan: no


# Defaults are written as params.yaml shows them (0, not 0.0): the file is rendered from them.

class DataParams(_Section):
    """prepare stage"""
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the train/val/test split and cross-validation's "
                            "folds")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="fraction held out for choosing the best epoch (carved "
                                "out of train when a data set has no val split of its own)")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="fraction held out for the final evaluation, "
                                 "stratified (used only when a data set has no test split of its own: cifar/mnist "
                                 "sets and root/test/ keep theirs)")
    resize: Literal[RESIZE_POLICIES] = Field("center_crop", description="center_crop: shorter side to image_size, "
                                             "centre crop | stretch: ignore aspect ratio")
    duplicate_threshold: float = Field(0.9, ge=0.5, le=1, description="images whose 16×16 thumbnails are at least "
                                       "this alike (cosine of colour layout and detail, 1 = the same) are "
                                       "near-duplicates: kept in one split, listed in metrics/data_card.md; resized, "
                                       "re-encoded, colour-shifted and slightly cropped copies score above 0.9")
    group_by: str | None = Field(None, min_length=1, description="a regular expression over each image's path "
                                    "(relative to data_dir); images with the same match (its first group, if it has "
                                    "one) stay in one split and one fold, e.g. '([^/_]+)_[^/]*$' for "
                                    "files named <patient>_<n>.jpg; null: duplicates are the only groups")
    labels_csv: str = Field("labels.csv", min_length=1, description="task=multilabel: the labels, a CSV inside "
                            "data_dir with columns path (relative to data_dir), labels (joined by label_separator; "
                            "empty: none of them) and optionally split (train | val | test)")
    classes: list[str] | None = Field(None, description="task=multilabel: the labels, in this order (a row of "
                                      "labels_csv with another label is skipped as unknown, and listed in the data "
                                      "card); null: every label labels_csv names, sorted")
    label_separator: str = Field(";", min_length=1, max_length=3, description="task=multilabel: what joins the "
                                 "labels of one image in labels_csv, e.g. ';' for cat;dog (' ' for Kaggle's Planet)")
    leakage: Literal["report", "drop_from_test", "error"] = Field("report", description="a data set split by its "
                                                                  "maker (root/train|val|test, cifar, mnist) whose "
                                                                  "test or val images have a near-duplicate or "
                                                                  "group member in train: report (the card lists "
                                                                  "them, evaluate adds clean-test figures) | "
                                                                  "drop_from_test | error")

    @field_validator("group_by")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc}); e.g. '([^/_]+)_[^/]*$'") from None
        return value


def _range(low: float, high: float, what: str):
    """A validator for a [min, max] pair inside [low, high]."""
    def check(value: Any) -> Any:
        ok = (isinstance(value, list) and len(value) == 2 and all(type(v) in (int, float) for v in value)
              and low <= value[0] <= value[1] <= high and value[1] > 0)
        if not ok:
            raise ValueError(f"use [min, max] with {low:g} ≤ min ≤ max ≤ {high:g} ({what})")
        return [float(v) for v in value]
    return field_validator(what, mode="before")(classmethod(lambda cls, v: check(v)))


class AugmentParams(_Section):
    """training-time augmentation, drawn independently for every image in a batch"""
    resized_crop: Literal["auto"] | bool = Field("auto", description="random-resized crop (timm/torchvision's "
                                                 "RandomResizedCrop) of the stored image to image_size, instead of "
                                                 "random_crop; auto: on when weights are loaded (prepare then keeps "
                                                 "images at image_size / crop_pct, e.g. 256 for 224, and evaluation "
                                                 "takes the centre crop), off from scratch")
    resized_crop_scale: list[float] = Field([0.25, 1.0], description="the crop's area as a fraction of the image "
                                            "(timm's default 0.08 is for ImageNet from scratch; small photo sets keep "
                                            "more of each image)")
    resized_crop_ratio: list[float] = Field([0.75, 1.3333], description="the crop's aspect ratio range (width / "
                                            "height)")
    random_crop: bool = Field(True, description="pad each side by crop_padding pixels (black), crop back at a "
                              "random offset")
    crop_padding: int = Field(2, ge=0, le=64, description="pixels; 4 is usual for 32-px photos, 2 suits digits "
                              "(8 px upsampled ×4)")
    hflip: bool = Field(False, description="random left-right mirror; off for digits (a mirrored 2 is not a 2), on "
                        "for photos (cifar10, your own folders)")
    rotate_degrees: float = Field(0, ge=0, le=180, description="random rotation in [-d, +d] degrees; 0 = off")
    scale: float = Field(0, ge=0, lt=1, description="random zoom in [1-s, 1+s]; 0 = off (e.g. 0.1)")
    color_jitter: float = Field(0, ge=0, lt=1, description="brightness/contrast/saturation factors in [1-j, 1+j]; "
                                "0 = off (e.g. 0.2)")
    random_erasing: float = Field(0, ge=0, le=1, description="probability of blanking one random box (2-33 % of the "
                                  "image); 0 = off (e.g. 0.25)")

    _scale = _range(0.01, 1.0, "resized_crop_scale")
    _ratio = _range(0.1, 10.0, "resized_crop_ratio")


class TrainParams(_Section):
    """train stage"""
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = Field("adamw", description="adamw | adam | sgd | rmsprop")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and rmsprop")
    nesterov: bool = Field(True, description="sgd: Nesterov momentum")
    weight_decay: float = Field(0.0005, ge=0, le=1, description="L2 on conv/linear weights (not on norms and biases)")
    scheduler: Literal["cosine", "step", "onecycle", "none"] = Field("cosine", description="cosine: decay to 0 | "
                                                                     "step: ×step_gamma every step_epochs | onecycle "
                                                                     "| none: constant")
    warmup_epochs: float = Field(0, ge=0, description="linear warmup from lr/100 over this many epochs (fractions "
                                 "allowed); 0 = off")
    step_epochs: int = Field(30, ge=1, description="scheduler=step only")
    step_gamma: float = Field(0.1, gt=0, le=1, description="scheduler=step only")
    label_smoothing: float = Field(0, ge=0, lt=1, description="e.g. 0.1")
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout before the head; null = the model's default "
                                  "(original 0.2, alexnet 0.5, timm 0)")
    drop_path: float = Field(0, ge=0, lt=1, description="stochastic depth rate, for timm models that have it (resnet, "
                             "efficientnet, convnext)")
    mixup_alpha: float = Field(0, ge=0, description="MixUp Beta(α, α); 0 = off (e.g. 0.2)")
    cutmix_alpha: float = Field(0, ge=0, description="CutMix Beta(α, α); 0 = off (e.g. 1.0); both on: each batch "
                                "picks one")
    grad_clip: float = Field(0, ge=0, description="max gradient norm; 0 = off")
    patience: int = Field(0, ge=0, description="early stopping: stop after this many epochs without improvement; "
                          "0 = off")
    min_delta: float = Field(0, ge=0, description="the smallest change of `monitor` that counts as an improvement")
    monitor: Literal["auto", "val_accuracy", "val_loss", "val_map"] = Field(
        "auto", description="picks the best epoch (the one evaluated and exported): val_accuracy | val_loss | val_map "
        "(task=multilabel: the mean average precision over labels); auto: val_accuracy, or val_map for multilabel")
    asymmetric_loss: bool = Field(False, description="task=multilabel: the asymmetric loss (Ridnik et al. 2021: "
                                  "negatives weighted by p^4 after a 0.05 margin, so easy negatives count less) instead "
                                  "of binary cross-entropy: better label sets (CIFAR mosaics, fine-tuned: mAP +1.5 "
                                  "points), probabilities far from calibrated")
    thresholds: Literal["f1"] | Annotated[float, Field(gt=0, le=1)] = Field(
        "f1", description="task=multilabel: each label's decision threshold, chosen on the validation split: f1 "
        "(the threshold of best F1) | a precision to reach, e.g. 0.9 (the lowest threshold that reaches it)")
    class_weights: Literal["none", "balanced"] | list[float] = Field("none", description="loss weight per class: none "
                                                                     "| balanced (n / (classes × count); multilabel: "
                                                                     "each label's positives weighed by negatives / "
                                                                     "positives) | [w0, w1, ...]")
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", description="shuffle: every image once per epoch | "
                                                    "balanced: classes drawn equally often")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is visible, else cpu | "
                                                   "cpu | cuda")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="the training step's autocast: "
                                                               "auto: on a GPU bf16 where supported, else fp16; on a "
                                                               "CPU bf16 where it is native (AMX, AVX-512 BF16) and a "
                                                               "probe of the run's model finds it 1.2× as fast (its "
                                                               "answer remembered on the machine), else "
                                                               "fp32 | bf16 | fp16 (GPUs) | fp32; evaluation and "
                                                               "export run in fp32")
    compile: bool = Field(False, description="torch.compile the model's forward (and its backward): faster steps, a "
                          "slow first epoch (train prints what compiling cost)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="with compile: default | reduce-overhead (CUDA graphs: each step's kernels replayed "
        "as one graph; for fixed shapes) | max-autotune (also searches kernels: the longest first epoch) | "
        "max-autotune-no-cudagraphs")
    data_placement: Literal["auto", "device", "host"] = Field("auto", description="where the training images live: "
                                                              "device (a uint8 tensor on the GPU, batches indexed "
                                                              "there: no host copies) | host (the memory map; a "
                                                              "background thread gathers the next batches, a GPU "
                                                              "copies them from pinned memory on a side stream); "
                                                              "auto: device on a GPU when they take ≤ 1/4 of its free "
                                                              "memory, host on a CPU")
    ema_decay: float = Field(0, ge=0, lt=1, description="exponential moving average of the weights, updated every "
                             "step (e.g. 0.999; warmed up as TensorFlow's EMA: min(decay, (1+n)/(10+n)) after n "
                             "steps); the average is what is validated, kept, evaluated and exported; 0 = off")
    calibrate: bool = Field(True, description="temperature scaling: after training, one T fitted on the validation "
                            "split so that softmax(logits / T) is calibrated; evaluate reports ECE before and after, "
                            "export and predict give the calibrated probabilities (accuracy is unchanged)")
    nproc: int = Field(1, ge=1, le=64, description="processes (DDP under torchrun: gloo on CPU, nccl on GPUs); 1 = "
                       "plain training")
    num_threads: int = Field(0, ge=0, le=256, description="CPU threads per process; 0 = cores ÷ nproc (OMP_NUM_THREADS, when set, is the cores)")

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        if value in ("none", "balanced"):
            return value
        numbers = isinstance(value, list) and all(type(w) in (int, float) for w in value)
        if not numbers or not value or any(w < 0 for w in value) or not any(w > 0 for w in value):
            raise ValueError("use none, balanced, or a list of non-negative numbers, one per class (not all zero)")
        return [float(w) for w in value]


class TransferParams(_Section):
    """how loaded weights are fine-tuned (see finetune); no effect from scratch"""
    unfreeze_stages: int = Field(1, ge=0, description="partial: how many of the backbone's last stages train")
    head_epochs: int = Field(1, ge=1, description="two_phase: epochs of head-only training before unfreezing")
    backbone_lr_mult: float = Field(0.1, gt=0, le=10, description="the backbone's lr = lr × this: pretrained "
                                    "features need small steps, the new head large ones (1.0 = one lr for all)")
    freeze_batchnorm: bool = Field(True, description="keep the pretrained BatchNorm statistics while fine-tuning "
                                   "(its scale and shift still train): re-estimating them from small batches of a "
                                   "small data set undoes pretraining")
    augmented_passes: int = Field(0, ge=0, le=100, description="linear_probe: 0 = features of each training image "
                                  "computed once, unaugmented; N = N passes over the training split, each with its "
                                  "own augmentation (N× the feature time)")
    probe_l2: Literal["auto"] | Annotated[float, Field(ge=0, le=100)] = Field("auto", description="linear_probe: L2 "
                                                                              "strength λ of the head (a logistic "
                                                                              "regression on standardised features); "
                                                                              "auto: picked by validation log loss "
                                                                              "from 1e-4 … 1 (a head per value, "
                                                                              "seconds)")

    _probe_l2 = _auto_or("probe_l2", "a number, e.g. 0.01")


class MlflowParams(_Section):
    """MLflow: where the runs are recorded, and the model registry"""
    experiment: str = Field("auto", min_length=1, description="MLflow experiment the runs are recorded under; auto: "
                            "named after the data set (digits, cifar10, or your folder's name), so runs sorted by "
                            "accuracy compare like with like")
    required: bool = Field(True, description="true: an unreachable or unusable tracking store stops the pipeline "
                           "(one line, before training); false: the run goes on untracked, with a warning, its "
                           "outputs as usual")
    register_model: str | None = Field(None, min_length=1, description="report stage: also register the run's ONNX "
                                       "model in the MLflow Model Registry under this name (e.g. digits-classifier), "
                                       "one new version per run; null = log the model to the run only, register "
                                       "nothing")
    model_alias: str = Field("candidate", description="with register_model: alias moved to the new version (load it "
                             "as models:/<name>@candidate); promote a version by hand, e.g. to champion")

    @field_validator("register_model")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None:  # MLflow's own rule, so a bad name fails here, not after training
            from mlflow.exceptions import MlflowException
            from mlflow.utils.validation import _validate_model_name

            try:
                _validate_model_name(value)
            except MlflowException as exc:
                raise ValueError(f"{exc.message.split('. ', 1)[-1].rstrip('.')} (e.g. digits-classifier)") from None
        return value

    @field_validator("model_alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        # MLflow's own rules, checked here so a bad alias fails before training, not after export
        if not re.fullmatch(r"[\w-]+", value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError("use letters, digits, '_' and '-' (not 'latest' or v<number>: MLflow reserves them), "
                             "e.g. candidate or champion")
        return value


class EvaluateParams(_Section):
    """evaluate stage: what it computes and draws besides the test metrics"""
    tta: Literal[TTA_MODES] = Field("none", description="test-time augmentation, reported beside the plain figures "
                                    "(accuracy_tta, ...): none | hflip (the image and its mirror: 2× the time) | "
                                    "hflip_crops (5 crops and their mirrors: 10×); probabilities averaged. For photos; "
                                    "a mirrored digit is another digit")
    activations: bool = Field(True, description="metrics/activations.png: feature maps of early, middle and late "
                              "layers, a test image per class")
    filters: bool = Field(True, description="metrics/filters.png: first-layer filters, and inputs that maximise "
                          "deeper channels")
    embedding: bool = Field(True, description="metrics/embedding.png: the test split's penultimate features in 2-D "
                            "(PCA, then t-SNE)")
    label_issues: bool = Field(True, description="metrics/label_issues.csv (+ .png): images whose label the model "
                               "doubts (cleanlab), on out-of-fold probabilities when crossval ran, else on the "
                               "validation split")
    conformal_alpha: float = Field(0.1, ge=0, lt=0.5, description="prediction sets (split conformal, APS): each "
                                   "image's set of classes holds the true one with probability ≥ 1 − α, calibrated on "
                                   "the validation split; evaluate reports coverage and set sizes "
                                   "(metrics/prediction_sets.png), export and predict carry the sets; 0 = off")


class ExportParams(_Section):
    """export stage: the INT8 model beside the FP32 one"""
    int8: bool = Field(False, description="also models/int8/model.onnx: ONNX Runtime static quantization (int8 "
                       "weights per channel, int8 activations calibrated on training images), checked on the whole "
                       "test split against the FP32 model; smaller and faster on a CPU")
    int8_max_drop: float = Field(0.01, ge=0, le=1, description="the most test accuracy the INT8 model may lose "
                                 "against the FP32 one (0.01 = 1 point)")
    int8_on_drop: Literal["fail", "keep_fp32"] = Field("fail", description="when it loses more: fail (the stage "
                                                       "stops with one line) | keep_fp32 (no INT8 model, a note in "
                                                       "models/int8/)")
    int8_calibration_images: int = Field(256, ge=8, le=100_000, description="training images that calibrate the "
                                         "activations' ranges")


class PlotsParams(_Section):
    """evaluate stage: how the learning curves are drawn"""
    smoothing: float = Field(0, ge=0, lt=1, description="learning curves: exponential moving average of noisy curves "
                             "(0.6 = TensorBoard's default), the raw curves kept faint behind; 0 = off")


class CrossvalParams(_Section):
    """train stage: k-fold cross-validation, before the model itself"""
    folds: int = Field(0, description="k-fold cross-validation of the configured model on train+val (the test split "
                       f"is never used): 0 = off; 2..{MAX_FOLDS} = k more trainings, run by the train stage before "
                       "the model itself (an interrupted run keeps its finished folds); results in "
                       "metrics/crossval.json")

    @field_validator("folds")
    @classmethod
    def _off_or_k(cls, value: int) -> int:
        if value != 0 and not 2 <= value <= MAX_FOLDS:
            raise ValueError(f"use 0 (off) or a number of folds from 2 to {MAX_FOLDS}, e.g. 5")
        return value


class TuneParams(_Section):
    """python -m pipeline tune --trials N: each trial a DVC experiment and an MLflow run"""
    space: dict[str, Any] = Field({"lr": {"low": 0.0003, "high": 0.03, "log": True},
                                   "train.weight_decay": {"low": 0.00001, "high": 0.01, "log": True},
                                   "batch_size": [32, 64, 128]},
                                  description="params.yaml keys to search: {low, high, log} ranges or lists of "
                                  "choices")
    objective: Literal["auto", "best_val_accuracy", "best_val_loss", "crossval_accuracy", "best_val_map",
                       "crossval_map"] = Field(
        "auto", description="auto: crossval_accuracy (cross-validation's mean accuracy) when crossval.folds > 0, "
        "else best_val_accuracy (task=multilabel: the mAP, crossval_map / best_val_map); or best_val_loss. Never a "
        "test-split number")
    study: str = Field("image-classification", min_length=1, description="Optuna study name: a re-run with the same "
                       "name resumes it")
    storage: str = Field("auto", min_length=1, description="auto: sqlite:///<repo root>/optuna.db; a database URL "
                         "(postgresql://...) lets workers on several machines share one study. No password here: the "
                         "environment variable OPTUNA_STORAGE (which overrides this key) carries it")
    sampler: Literal["tpe", "random"] = Field("tpe", description="tpe (Optuna's default) or random")
    prune: bool = Field(True, description="stop trials whose per-epoch validation accuracy is below the median of "
                        "earlier trials at the same epoch (median pruning; not with crossval)")

    @field_validator("study")
    @classmethod
    def _study_name(cls, value: str) -> str:
        # it goes into MLflow search filters (tags.tune_study = '...') and DVC experiment names
        if not re.fullmatch(r"[A-Za-z0-9_.\- ]+", value) or not value.strip():
            raise ValueError("a study name takes letters (A-Z, a-z), digits, '-', '_', '.' and spaces, "
                             "e.g. tune.study: cifar10-resnet18")
        return value

    @field_validator("storage")
    @classmethod
    def _no_password(cls, value: str) -> str:
        if problem := password_problem("tune.storage", value, "OPTUNA_STORAGE"):
            raise ValueError(problem)
        return value

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, Any]) -> dict[str, Any]:
        for key, spec in space.items():
            if isinstance(spec, list):
                if not spec:
                    raise ValueError(f"{key}: give at least one value to choose from")
            elif isinstance(spec, dict):
                if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
                    raise ValueError(f"{key}: a range is {{low: .., high: .., log: true|false}}")
                low, high = spec["low"], spec["high"]
                if not all(type(v) in (int, float) for v in (low, high)) or not low < high:
                    raise ValueError(f"{key}: low must be a number below high (got low={low}, high={high})")
                if spec.get("log") and low <= 0:
                    raise ValueError(f"{key}: a log range needs low > 0")
            else:
                raise ValueError(f"{key}: use a list of values or {{low: .., high: .., log: ..}}")
        return space


class Params(_Section):
    """Every knob of the pipeline. Change a value here, or per experiment:
      dvc exp run -S lr=0.001 -S epochs=30 -S train.optimizer=sgd
    Unknown keys, wrong types and out-of-range values stop the pipeline in its check stage, before
    any stage that replaces an output, with a one-line error."""
    dataset: str = Field("digits", description=" | ".join(f"{name}: {d.description}" for name, d in DATASETS.items())
                         + f"; downloads are kept in {paths.RAW_DIR}/ (offline: place the archive there)")
    data_dir: str = Field(str(paths.RAW_DIR), min_length=1, description="dataset=folder: your folder of class "
                          "folders, root/<class>/*.jpg or root/{train,val,test}/<class>/*.jpg (e.g. photos, recorded "
                          f"with `dvc add photos`); the downloaded sets live in {paths.RAW_DIR}")
    task: Literal["multiclass", "multilabel"] = Field("multiclass", description="multiclass: one class per image "
                                                      "(class folders) | multilabel: any number of labels per image, "
                                                      "from data.labels_csv (dataset=folder)")
    model: str = Field("original", description="original: our small CNN, fast on a CPU; or any name `python -m "
                       "pipeline models` lists: ours (e.g. alexnet, resnet9) and timm's (e.g. resnet18, "
                       "tf_efficientnet_lite0)")
    epochs: int = Field(15, ge=1, le=10_000, description="passes over the training split; the best epoch on "
                        "validation is kept")
    batch_size: int = Field(64, le=65_536, description="images per optimisation step")
    lr: Literal["auto"] | Annotated[float, Field(gt=0, le=10)] = Field(
        "auto", description="peak learning rate; auto: a rate by optimizer, by whether the model has BatchNorm "
        "(alexnet has none: a lower lr) and by what trains (from scratch, fine-tuning loaded weights, a linear "
        "probe); train prints the one it picked, `pipeline lr-find` draws the range test")
    image_size: Literal["auto"] | Annotated[int, Field(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)] = Field(
        "auto", description="the model's input, image_size × image_size pixels; auto: the weights' input size (224 "
        "for ImageNet weights), else 32 (or the model's minimum: alexnet 64); smaller is faster on a CPU, e.g. -S "
        "image_size=128")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the initial weights, shuffling and augmentation (not "
                      "the split: data.split_seed), so models that differ only in seed share a split and can be "
                      "ensembled")
    pretrained: bool = Field(False, description="start from ImageNet weights (timm hub / torchvision); needs the "
                             "network once")
    weights: str | None = Field(None, description="or a local file instead (no network): a timm/torchvision state "
                                "dict (.pth/.safetensors) or one of our checkpoints (a copy of a models/model.pt); an "
                                "absolute path or one inside the repo. Either way the head is re-made for your "
                                "classes (starting at zero) and the preprocessing follows the weights: the model's "
                                "pretrained config (mean, std, input size, crop_pct) or the checkpoint's record; from "
                                "scratch, the data's own mean/std")
    finetune: Literal["full", "linear_probe", "partial", "two_phase"] = Field(
        "full", description="full: everything trains | linear_probe: only the head, trained in seconds on features "
        "the frozen backbone computes once | partial: last transfer.unfreeze_stages stages + head | two_phase: "
        "transfer.head_epochs of head only, then everything")
    data: DataParams = DataParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    transfer: TransferParams = TransferParams()
    mlflow: MlflowParams = MlflowParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    plots: PlotsParams = PlotsParams()
    crossval: CrossvalParams = CrossvalParams()
    tune: TuneParams = TuneParams()

    _lr = _auto_or("lr", "a number, e.g. 0.001")
    _image_size = _auto_or("image_size", "a whole number of pixels, e.g. 224")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown data set; allowed: {', '.join(DATASETS)}")
        return value

    @model_validator(mode="after")
    def _image_size_fits_the_model(self, info: ValidationInfo) -> "Params":
        if not _check_models(info):
            return self
        from pipeline.models import min_image_size

        if self.image_size != "auto" and self.image_size < (need := min_image_size(self.model)):
            raise ValueError(f"image_size={self.image_size}: {self.model} needs at least {need} px "
                             f"(e.g. -S image_size={max(need, 64)})")
        return self

    @model_validator(mode="after")
    def _two_phase_needs_more_epochs(self) -> "Params":
        if self.finetune == "two_phase" and self.transfer.head_epochs >= self.epochs:
            raise ValueError(f"transfer.head_epochs={self.transfer.head_epochs}: two_phase needs fewer head epochs "
                             f"than epochs={self.epochs}")
        return self

    @model_validator(mode="after")
    def _transfer_needs_weights(self) -> "Params":
        if self.finetune != "full" and not (self.pretrained or self.weights):
            raise ValueError(f"finetune={self.finetune} trains part of a network on top of learned features, but "
                             "there are none: set pretrained: true or weights: PATH, or finetune: full (from scratch)")
        return self

    @model_validator(mode="after")
    def _multilabel_needs_a_folder(self) -> "Params":
        if self.task == "multilabel" and self.dataset != "folder":
            raise ValueError(f"task=multilabel reads its labels from data.labels_csv in your folder, but "
                             f"dataset={self.dataset} has one class per image: set dataset=folder (and data_dir), "
                             "or task=multiclass")
        if self.task == "multiclass" and self.train.monitor == "val_map":
            raise ValueError("train.monitor=val_map is the mean average precision of task=multilabel; use val_accuracy "
                             "or val_loss (or auto)")
        if self.task == "multiclass" and self.train.asymmetric_loss:
            raise ValueError("train.asymmetric_loss weighs each label's negatives, for task=multilabel; one class per "
                             "image trains with cross-entropy (set it to false)")
        if self.task == "multilabel" and self.train.sampler == "balanced":
            raise ValueError("train.sampler=balanced draws classes equally often, which needs one class per image; "
                             "use train.sampler=shuffle with task=multilabel (train.class_weights: balanced weighs "
                             "each label's positives instead)")
        return self

    @model_validator(mode="after")
    def _folder_needs_a_data_dir(self) -> "Params":
        if self.dataset == "folder" and self.data_dir == str(paths.RAW_DIR):
            raise ValueError("dataset=folder needs data_dir set to your folder of class folders "
                             "(e.g. -S dataset=folder -S data_dir=data/images)")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str, info: ValidationInfo) -> str:
        if not _check_models(info):
            return value
        from pipeline.models import model_name_problem

        if problem := model_name_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("batch_size")
    @classmethod
    def _two_or_more(cls, value: int) -> int:
        if value < 2:
            raise ValueError("use at least 2: BatchNorm layers cannot train on a batch of one image (e.g. 32)")
        return value

    def experiment_name(self) -> str:
        """The MLflow experiment the runs go to: `mlflow.experiment`, or with `auto` the data
        set's name (a folder's own name), so that sorting runs by accuracy compares like with like."""
        if self.mlflow.experiment != "auto":
            return self.mlflow.experiment
        return display_name(self.dataset, self.data_dir)

    def flat(self) -> dict[str, Any]:
        """All params as `section.key: value`, for MLflow."""
        out: dict[str, Any] = {}
        for key, value in self.model_dump().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


def _describe(err: dict[str, Any]) -> str:
    # keep field names and list positions; drop pydantic's union-branch tags like "list[float]"
    loc = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or str(p).isidentifier())
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        model: type[BaseModel] = Params
        for part in parent:
            model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
        allowed = ", ".join(model.model_fields)
        where = f" in '{'.'.join(map(str, parent))}'" if parent else ""
        return f"unknown key '{loc}'{where}; allowed keys: {allowed}"
    msg = err["msg"].removeprefix("Value error, ")
    value = redact(err["input"]) if isinstance(err["input"], str) else err["input"]
    return f"{loc}={value!r}: {msg}" if loc else msg


def parse_params(raw: Any, source: str = str(paths.PARAMS), check_models: bool = True) -> Params:
    """Validate a params mapping; raise `UserError` naming the first bad key."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw, context={"skip_models": not check_models})
    except ValidationError as exc:
        raise UserError(f"{source}: {_describe(exc.errors()[0])}") from None


class StageParams:
    """The params a stage declared it reads (`section` or `section.key`), validated; reading
    anything else raises AttributeError naming the key to declare."""

    def __init__(self, params: BaseModel, keys: set[str], prefix: str = ""):
        self._params, self._keys, self._prefix = params, keys, prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = self._prefix + name
        if key in self._keys or self._prefix.rstrip(".") in self._keys:
            return getattr(self._params, name)
        if any(k.startswith(key + ".") for k in self._keys):
            return StageParams(getattr(self._params, name), self._keys, key + ".")
        raise AttributeError(f"this stage reads params key {key!r} without declaring it: add it to the stage's "
                             "params in dvc.yaml")

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """Every param, as a record (the checkpoint's, the MLflow run's), not as an input."""
        return self._params.model_dump(**kwargs)

    def flat(self) -> dict[str, Any]:
        return self._params.flat()

    def experiment_name(self) -> str:
        """Where the run is recorded (a record: reads `mlflow.experiment`, and with `auto` the
        data set's name, which every stage that logs already depends on through its data)."""
        return self._params.experiment_name()


class YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader reading numbers as YAML 1.2 does (and as DVC writes them): `1e-05`,
    which YAML 1.1 without a dot reads as a string, is a float. On libyaml's parser where PyYAML
    has it (its wheels do): the same values, 8x faster (params.yaml 15 → 2 ms, dvc.lock 55 → 8 ms;
    every stage reads params.yaml and dvc.yaml)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """Params text (params.yaml, a commit's, dvc.lock's) as Python values."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506  (a subclass of SafeLoader)


def update_params_file(path: Path, updates: dict[str, Any]) -> None:
    """Set dotted keys (`train.optimizer`) in a params file, keeping its comments and layout
    (ruamel.yaml's round trip, as DVC's own `-S` does)."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.width = 4096  # keep long comment lines as they are
    yaml_rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    params = yaml_rt.load(path.read_text())
    for key, value in updates.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    with open(path, "w") as f:
        yaml_rt.dump(params, f)


DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"  # beside the code that runs, wherever the stage's cwd is


def stage_keys(stage: str, dvc_yaml: Path = DVC_YAML) -> tuple[str, ...]:
    """The params.yaml keys the DVC stage `stage` reads: its `params:` in dvc.yaml, the one
    place they are written (the stage's view, the resume fingerprint and the tests take them from here)."""
    try:
        spec = read_yaml(dvc_yaml.read_text())["stages"][stage]
    except (OSError, KeyError, TypeError) as exc:
        raise UserError(f"{dvc_yaml}: cannot read the params of stage {stage!r} ({exc})") from None
    return tuple(k for k in spec.get("params") or () if isinstance(k, str))


def load_params(path: Path = paths.PARAMS, stage: str | None = None,
                check_models: bool = True) -> Params | StageParams:
    """Read and validate params.yaml; with `stage`, a view of just the keys the DVC stage reads
    (its `params:` in dvc.yaml)."""
    keys = None if stage is None else stage_keys(stage)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; run from the repository root") from None
    try:
        raw = read_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    reads_model = check_models and (keys is None or "model" in keys)
    params = parse_params(raw, str(path), check_models=reads_model)
    return params if keys is None else StageParams(params, set(keys))
