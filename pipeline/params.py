"""params.yaml → typed, validated objects, at the edge.

Every stage calls `load_params(keys=PARAMS)` first, with KEYS the params it reads (the same list as
its `params:` in dvc.yaml: tests/test_dvc_yaml.py checks it). The whole file is validated
(unknown key, wrong type, value out of range: `UserError`, one line naming the key, the bad
value and what is allowed), and the stage gets a view that holds only its KEYS: reading any
other key is an error, so a stage cannot depend on a param DVC does not know it depends on.
Model names are checked against the registry (which imports torch and timm, seconds) only
where `model` is read.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline import paths
from pipeline.errors import UserError
from pipeline.secrets import password_problem, redact

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "folder")


def _check_models(info: ValidationInfo) -> bool:
    return not (info.context or {}).get("skip_models", False)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)  # .inf, .nan: no


class DataParams(_Section):
    split_seed: int = Field(0, ge=0, le=2**32 - 1)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    resize: Literal["center_crop", "stretch"] = "center_crop"


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
    resized_crop: Literal["auto"] | bool = "auto"
    resized_crop_scale: list[float] = [0.25, 1.0]
    resized_crop_ratio: list[float] = [0.75, 4 / 3]
    random_crop: bool = True
    crop_padding: int = Field(2, ge=0, le=64)
    hflip: bool = False
    rotate_degrees: float = Field(0.0, ge=0, le=180)
    scale: float = Field(0.0, ge=0, lt=1)
    color_jitter: float = Field(0.0, ge=0, lt=1)
    random_erasing: float = Field(0.0, ge=0, le=1)

    _scale = _range(0.01, 1.0, "resized_crop_scale")
    _ratio = _range(0.1, 10.0, "resized_crop_ratio")


class TrainParams(_Section):
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    scheduler: Literal["cosine", "step", "onecycle", "none"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_epochs: int = Field(30, ge=1)
    step_gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    drop_path: float = Field(0.0, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0)
    patience: int = Field(0, ge=0)
    min_delta: float = Field(0.0, ge=0)
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    data_placement: Literal["auto", "device", "host"] = "auto"
    ema_decay: float = Field(0.0, ge=0, lt=1)
    calibrate: bool = True
    nproc: int = Field(1, ge=1, le=64)
    num_threads: int = Field(0, ge=0, le=256)

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
    unfreeze_stages: int = Field(1, ge=0)
    head_epochs: int = Field(1, ge=1)
    backbone_lr_mult: float = Field(0.1, gt=0, le=10)
    freeze_batchnorm: bool = True
    augmented_passes: int = Field(0, ge=0, le=100)
    probe_l2: Literal["auto"] | Annotated[float, Field(ge=0, le=100)] = "auto"


class MlflowParams(_Section):
    experiment: str = Field("auto", min_length=1)  # auto: named after the data set (`experiment_name`)
    required: bool = True
    register_model: str | None = Field(None, min_length=1)
    model_alias: str = "candidate"

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
    tta: Literal["none", "hflip", "hflip_crops"] = "none"
    activations: bool = True
    filters: bool = True
    embedding: bool = True
    label_issues: bool = True


class PlotsParams(_Section):
    smoothing: float = Field(0.0, ge=0, lt=1)


MAX_FOLDS = 100


class CrossvalParams(_Section):
    folds: int = 0

    @field_validator("folds")
    @classmethod
    def _off_or_k(cls, value: int) -> int:
        if value != 0 and not 2 <= value <= MAX_FOLDS:
            raise ValueError(f"use 0 (off) or a number of folds from 2 to {MAX_FOLDS}, e.g. 5")
        return value


class TuneParams(_Section):
    """`python -m pipeline tune`: the search space and how to search it (pipeline/tune.py)."""
    space: dict[str, Any] = {}   # "lr": {low, high, log}, "train.optimizer": [sgd, adamw], ...
    objective: Literal["auto", "best_val_accuracy", "best_val_loss", "crossval_accuracy"] = "auto"
    study: str = Field("image-classification", min_length=1)
    storage: str = Field("auto", min_length=1)
    sampler: Literal["tpe", "random"] = "tpe"
    prune: bool = True

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
    dataset: str = "digits"
    data_dir: str = Field(str(paths.RAW_DIR), min_length=1)
    model: str = "original"
    epochs: int = Field(15, ge=1, le=10_000)
    batch_size: int = Field(64, le=65_536)
    lr: Literal["auto"] | Annotated[float, Field(gt=0, le=10)] = "auto"
    image_size: Literal["auto"] | Annotated[int, Field(ge=8, le=1024)] = "auto"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    pretrained: bool = False
    weights: str | None = None
    finetune: Literal["full", "linear_probe", "partial", "two_phase"] = "full"
    data: DataParams = DataParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    transfer: TransferParams = TransferParams()
    mlflow: MlflowParams = MlflowParams()
    evaluate: EvaluateParams = EvaluateParams()
    plots: PlotsParams = PlotsParams()
    crossval: CrossvalParams = CrossvalParams()
    tune: TuneParams = TuneParams()

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

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and 8 <= value <= 1024):
            return value
        raise ValueError("use auto or a whole number of pixels from 8 to 1024")

    @field_validator("lr", mode="before")
    @classmethod
    def _lr(cls, value: Any) -> Any:
        if value == "auto" or (type(value) in (int, float) and 0 < value <= 10):
            return value
        if type(value) in (int, float) and math.isfinite(value):
            raise ValueError("Input should be greater than 0" if value <= 0 else "Input should be at most 10")
        raise ValueError("use auto or a number, e.g. 0.001")

    def experiment_name(self) -> str:
        """The MLflow experiment the runs go to: `mlflow.experiment`, or with `auto` the data
        set's name (a folder's own name), so that sorting runs by accuracy compares like with like."""
        if self.mlflow.experiment != "auto":
            return self.mlflow.experiment
        from pipeline.data.registry import display_name

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


def trains_on_augmented_images(finetune: str, augmented_passes: int) -> bool:
    """False for a linear probe on features computed once from the unaugmented images."""
    return finetune != "linear_probe" or augmented_passes > 0


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
                             "PARAMS and to its params in dvc.yaml")

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """Every param, as a record (the checkpoint's, the MLflow run's), not as an input."""
        return self._params.model_dump(**kwargs)

    def flat(self) -> dict[str, Any]:
        return self._params.flat()

    def experiment_name(self) -> str:
        """Where the run is recorded (a record: reads `mlflow.experiment`, and with `auto` the
        data set's name, which every stage that logs already depends on through its data)."""
        return self._params.experiment_name()


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does (and as DVC writes them): `1e-05`,
    which YAML 1.1 without a dot reads as a string, is a float."""


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


def load_params(path: Path = paths.PARAMS, keys: tuple[str, ...] | None = None,
                check_models: bool = True) -> Params | StageParams:
    """Read and validate params.yaml; with `keys`, a view of just those keys."""
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
