"""The training loop, in the parts torchvision's references have: `train_one_epoch`,
`evaluate` (of the validation split), resume `save_resume`/`load_resume`, and `fit` that puts
them together and keeps the best epoch on validation.

What a batch is comes from outside: `ImageBatches` (pipeline.training.batches) draws uint8
images from the prepared arrays and augments them per sample (`train`); `FeatureBatches` (pipeline.training.probe) draws cached
penultimate features of a frozen backbone, so a linear probe trains in seconds."""
from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.core.io import save_torch
from pipeline.core.params import AugmentParams, TrainParams
from pipeline.core.preprocess import Preprocessing
from pipeline.models import head_parameter_names
from pipeline.training import precision
from pipeline.training.batches import ImageBatches, resident_on, split_batches
from pipeline.training.distributed import cpu_cores, distributed, shard
from pipeline.training.ema import make_ema
from pipeline.training.objective import LabelMixer, Objective, positive_weights
from pipeline.training.recipe import (
    EarlyStopping,
    make_mixer,
    make_optimizer,
    make_scheduler,
    param_groups,
)
from pipeline.training.strategy import Strategy
from pipeline.training.transfer import (
    apply_trainable,
    freeze_batchnorm_stats,
    trainable_names,
)


@dataclass(frozen=True)
class TrainConfig:
    """A training run, as the train stage resolved it from the params (`lr: auto`, the strategy,
    `resized_crop: auto`, class weights, the device)."""
    epochs: int
    batch_size: int
    lr: float                                          # resolved: `lr: auto` is a number here
    seed: int
    train: TrainParams = TrainParams()                 # optimizer, schedule, loss, sampler, precision, threads
    augment: AugmentParams = AugmentParams()           # resized_crop: a bool here (auto resolved by the strategy)
    strategy: Strategy = Strategy()                    # resolved from finetune, the weights and transfer
    class_weights: list[float] | None = None           # resolved from train.class_weights; None: all 1
    device: str = "cpu"                                # resolved from train.device
    resume_path: Path | None = None  # checkpoint written after every epoch, resumed from when it matches
    fingerprint: str = ""     # hash of what makes the run (params, data, code): resume only when equal
    multilabel: bool = False  # task=multilabel: k-hot labels, a sigmoid per label (the prepared data says)

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", self.strategy.augment(self.augment))

    @property
    def objective(self) -> Objective:
        return Objective(self.multilabel, self.multilabel and self.train.asymmetric_loss)

    @property
    def monitor(self) -> str:
        """train.monitor, with auto resolved: val_map for labels, else val_accuracy."""
        if self.train.monitor != "auto":
            return self.train.monitor
        return "val_map" if self.multilabel else "val_accuracy"


@dataclass
class TrainResult:
    best_state: dict
    best_epoch: int
    history: pd.DataFrame
    metrics: dict = field(default_factory=dict)   # the same for the same inputs
    timing: dict = field(default_factory=dict)    # seconds, images/s, threads: differ run to run
    val_logits: np.ndarray | None = None          # of the kept weights on the val split (temperature scaling)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def augmentation_generator(device: torch.device, seed: int) -> torch.Generator:
    """The seeded generator augmentation draws from, on the training device: a GPU draws its
    random numbers itself instead of waiting for them from the host every step. A CPU run keeps
    the CPU generator, and with it the same numbers as ever; a GPU's (Philox) are others."""
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)


def set_threads(num_threads: int) -> int:
    n = num_threads or cpu_cores()
    torch.set_num_threads(n)
    return n


def resolve_class_weights(spec: str | list[float], labels: np.ndarray, classes: list[str]) -> list[float] | None:
    """`none` → None; `balanced` → n / (k · count_c) (scikit-learn's definition), or for k-hot
    labels each label's negatives / positives (its positive weight); a list is checked against
    the number of classes."""
    if spec == "none":
        return None
    if spec == "balanced" and np.asarray(labels).ndim == 2:
        return positive_weights(labels)
    if spec == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(labels)
        weights = np.zeros(len(classes))
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
        return [float(w) for w in weights]
    if len(spec) != len(classes):
        from pipeline.core.errors import UserError

        raise UserError(f"train.class_weights has {len(spec)} values but the data set has {len(classes)} classes "
                        f"({', '.join(classes)}); give one weight per class")
    return [float(w) for w in spec]


def epoch_order(labels: np.ndarray, sampler: str, gen: torch.Generator) -> np.ndarray:
    """The training indices of one epoch: a permutation (`shuffle`), or `balanced`: as many
    draws with replacement, each class equally likely (WeightedRandomSampler's scheme)."""
    n = len(labels)
    if sampler == "balanced":
        counts = np.bincount(labels)
        weights = torch.from_numpy(1.0 / counts[labels])
        return torch.multinomial(weights, n, replacement=True, generator=gen).numpy()
    return torch.randperm(n, generator=gen).numpy()


def head_out_features(model: nn.Module) -> int:
    from pipeline.models import head_of

    return head_of(model).out_features


def _rng_state(gen: torch.Generator, aug_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "gen": gen.get_state(), "aug_gen": aug_gen.get_state(),
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict, gen: torch.Generator, aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    try:
        aug_gen.set_state(state["aug_gen"])
    except RuntimeError:  # saved by a run on another kind of device: its generator's state does not fit
        print("train: the resumed run's augmentation generator was on another kind of device; "
              "augmentation continues from a fresh seed", flush=True)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Optimization:
    """Optimizer, schedule, loss and precision of one run: what a step needs."""
    opt: torch.optim.Optimizer
    sched: object
    stopper: EarlyStopping
    mixer: object
    loss_weight: torch.Tensor | None
    label_smoothing: float
    grad_clip: float
    amp_dtype: torch.dtype | None
    scaler: object
    objective: Objective = Objective()
    graphs: bool = False  # the forward is compiled into CUDA graphs: each step tells them a new one begins

    def step(self, model: nn.Module, forward: nn.Module, xb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(xb.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = forward(xb)
        loss = self.objective.loss(logits.float(), target, self.loss_weight, self.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        return loss, logits

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "early_stopping": self.stopper.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(state["early_stopping"])


def optimizer_for(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer at peak lr `lr`: the head's, the backbone's × the strategy's multiplier."""
    groups = param_groups(model, cfg.train.weight_decay, lr, cfg.strategy.backbone_lr_mult, head_parameter_names(model))
    return make_optimizer(groups, cfg.train, lr)


def _optimization(model: nn.Module, cfg: TrainConfig, device: torch.device, steps_per_epoch: int,
                  amp_dtype: torch.dtype | None = None) -> _Optimization:
    r = cfg.train
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    opt = optimizer_for(model, cfg, cfg.lr)
    loss_weight = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device) if cfg.class_weights else None
    mixer = (LabelMixer(r.mixup_alpha, r.cutmix_alpha) if cfg.multilabel and (r.mixup_alpha or r.cutmix_alpha)
             else None if cfg.multilabel else make_mixer(r, int(head_out_features(model))))
    return _Optimization(opt, make_scheduler(opt, r, cfg.epochs, steps_per_epoch),
                         EarlyStopping(cfg.monitor, r.patience, r.min_delta),
                         mixer, loss_weight, r.label_smoothing, r.grad_clip,
                         amp_dtype, scaler, graphs=r.compile and r.compile_mode in ("reduce-overhead", "max-autotune"),
                         objective=cfg.objective)


BAR_SECONDS = 2.0  # the progress bar's loss and accuracy are read from the device this often


def train_one_epoch(model: nn.Module, forward: nn.Module, data, y: torch.Tensor, batches: list[np.ndarray],
                    optim: _Optimization, gen: torch.Generator, bar, ema=None) -> tuple[float, int, int]:
    """One pass over `batches` of training indices: (loss sum, correct, images seen). The sums
    stay on the device (float64, the same values as summing `loss.item()` on the host) and are
    read once at the end, and every BAR_SECONDS for the progress bar: no step waits for the host
    (the indices reach the device once per epoch, augmentation draws on the device, nothing is
    read back). The weights' moving average `ema`, when kept, follows every step."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=y.device)
    correct = torch.zeros((), dtype=torch.float64, device=y.device)
    seen, t0 = 0, time.perf_counter()
    shown = t0
    batches = [np.sort(idx) for idx in batches]  # sorted reads are sequential in a memory-mapped array
    for xb, at in data.epoch(batches, gen):
        yb = y[at]
        target = yb
        if optim.mixer is not None:
            xb, target = optim.mixer(xb, yb)  # soft targets, one λ per batch
        loss, logits = optim.step(model, forward, xb, target)
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.detach().double() * len(at)
        correct += optim.objective.correct(logits.detach(), target)
        seen += len(at)
        bar.update(1)
        if not bar.disable and (now := time.perf_counter()) - shown >= BAR_SECONDS:
            shown = now
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{int(correct) / seen:.4f}",
                            img_s=f"{seen / (now - t0):.0f}", refresh=False)
    return float(loss_sum), float(correct), seen


@dataclass
class _Best:
    """The kept epoch: its weights, number and validation logits."""
    state: dict | None = None
    epoch: int = 0
    val_logits: torch.Tensor | None = None


def save_resume(cfg: TrainConfig, epoch: int, model: nn.Module, optim: _Optimization, history: list[dict],
                best: _Best, gen: torch.Generator, aug_gen: torch.Generator, ema=None) -> None:
    """Everything needed to continue after `epoch` as if never interrupted."""
    save_torch({"fingerprint": cfg.fingerprint, "epoch": epoch, "model": model.state_dict(), **optim.state_dict(),
                "history": history, "best_state": best.state, "best_epoch": best.epoch,
                "best_val_logits": best.val_logits, "ema": ema.state_dict() if ema is not None else None,
                "rng": _rng_state(gen, aug_gen)}, cfg.resume_path)


def resume_epoch(cfg: TrainConfig) -> int:
    """The last epoch a matching resume checkpoint holds (training will continue after it), or 0."""
    if not (cfg.resume_path and cfg.resume_path.exists()):
        return 0
    try:
        ckpt = torch.load(cfg.resume_path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file: `load_resume` sets it aside and says so
        return 0
    return int(ckpt["epoch"]) if isinstance(ckpt, dict) and ckpt.get("fingerprint") == cfg.fingerprint else 0


def load_resume(cfg: TrainConfig, model: nn.Module, optim: _Optimization, gen: torch.Generator,
                aug_gen: torch.Generator, rank: int, ema=None) -> tuple[int, list[dict], _Best]:
    """(first epoch to run, history, the best so far): from a matching resume checkpoint, or a
    fresh start. The weights' moving average `ema` is restored with the rest."""
    fresh = (1, [], _Best())
    if not (cfg.resume_path and cfg.resume_path.exists()):
        return fresh
    try:
        ckpt = torch.load(cfg.resume_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file (zip, pickle, EOF)
        if rank == 0:
            aside = cfg.resume_path.with_name(cfg.resume_path.name + ".damaged")
            cfg.resume_path.replace(aside)
            print(f"train: {cfg.resume_path} is damaged ({type(exc).__name__}); moved it to {aside}, starting fresh",
                  flush=True)
        return fresh
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != cfg.fingerprint:
        if rank == 0:
            print(f"train: {cfg.resume_path} was made with other params, data or code; starting fresh", flush=True)
        return fresh
    model.load_state_dict(ckpt["model"])
    optim.load_state_dict(ckpt)
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    _set_rng_state(ckpt["rng"], gen, aug_gen)
    if rank == 0:
        print(f"train: resuming from {cfg.resume_path} after epoch {ckpt['epoch']}", flush=True)
    return ckpt["epoch"] + 1, ckpt["history"], _Best(ckpt["best_state"], ckpt["best_epoch"], ckpt["best_val_logits"])


def fit(model: nn.Module, y_train: np.ndarray, data, cfg: TrainConfig,
        on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True) -> TrainResult:
    """Train `model` on `data` (an `ImageBatches` or a `FeatureBatches`); return the
    best-on-validation weights, the per-epoch history and a summary. `on_epoch(epoch, row)`
    is called after each epoch (MLflow logging). With `cfg.resume_path`, a checkpoint is
    written after every epoch and a matching one is resumed."""
    rank, world = distributed()
    progress = progress and rank == 0
    threads = set_threads(cfg.train.num_threads or max(1, cpu_cores() // world))
    gen = seed_everything(cfg.seed)  # the epoch order: the same on every rank
    device = torch.device(cfg.device)
    aug_gen = augmentation_generator(device, cfg.seed + 1 + rank)  # each rank its own
    y_np = np.asarray(y_train)
    steps_per_epoch = len(split_batches(shard(np.arange(len(y_np)), rank, world), cfg.batch_size))
    if steps_per_epoch == 0:
        from pipeline.core.errors import UserError

        raise UserError(f"the training split has {len(y_np)} image(s) for {world} process(es): too few to make a "
                        "batch of 2; add images, or lower data.val_fraction / data.test_fraction or train.nproc")
    forward = _placed(model, cfg, device, world)
    y_t = cfg.objective.targets(y_np, device)
    amp_dtype, why = precision.resolve(cfg.train.precision, device, model,
                                       precision.sample_batch(data, cfg.batch_size, device),
                                       lambda m: set_epoch_mode(m, cfg, cfg.epochs))  # the last phase's
    # parameters: two_phase spends most epochs there; full and partial train the same ones throughout
    amp_dtype = _as_on_rank_0(amp_dtype, device, world)  # a timed probe could differ between processes
    if progress and why != precision.NO_NATIVE:
        print(f"train: precision {why}", flush=True)
    optim = _optimization(model, cfg, device, steps_per_epoch, amp_dtype)
    ema = make_ema(model, cfg.train.ema_decay)
    evaluated = ema.module if ema is not None else model  # what is validated, kept and returned
    start_epoch, rows, best = load_resume(cfg, model, optim, gen, aug_gen, rank, ema)
    for row in rows:  # a resumed run's MLflow run gets the whole curve
        if on_epoch and rank == 0:
            on_epoch(row["epoch"], {k: v for k, v in row.items() if k not in ("seconds", "images")})

    loop_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        if optim.stopper.should_stop:
            break
        changes = cfg.strategy.trains(epoch) != cfg.strategy.trains(epoch - 1)  # two_phase unfreezes
        trainable = set_epoch_mode(model, cfg, epoch, announce=progress and (epoch == start_epoch or changes))
        batches = split_batches(shard(epoch_order(y_np, cfg.train.sampler, gen), rank, world), cfg.batch_size)
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=True,
                   disable=not (progress and sys.stderr.isatty()), mininterval=0.5, dynamic_ncols=True)
        t0 = time.perf_counter()
        loss_sum, correct, seen = train_one_epoch(model, forward, data, y_t, batches, optim, aug_gen, bar, ema)
        loss_sum, correct, seen = _summed_over_ranks(loss_sum, correct, seen, device, world)
        epoch_seconds = time.perf_counter() - t0
        val_logits = data.val_logits(evaluated)
        val = cfg.objective.val_metrics(val_logits, data.val_y)
        val_loss = val["val_loss"]
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               **val, "lr": optim.opt.param_groups[-1]["lr"],
               "images_per_second": seen / epoch_seconds, "trainable_params": trainable,
               "seconds": epoch_seconds, "images": seen}
        rows.append(row)
        _report_epoch(row, cfg.epochs, bar, progress)
        if optim.stopper.step(row[cfg.monitor], None if cfg.monitor == "val_loss" else val_loss):
            best = _Best({k: v.detach().to("cpu", copy=True) for k, v in evaluated.state_dict().items()}, epoch,
                         val_logits)
        if on_epoch and rank == 0:
            on_epoch(epoch, {k: v for k, v in row.items() if k not in ("seconds", "images")})
        if cfg.resume_path and rank == 0:
            save_resume(cfg, epoch, model, optim, rows, best, gen, aug_gen, ema)
        if optim.stopper.should_stop and progress:
            r = cfg.train
            print(f"train: early stopping after epoch {epoch}: {cfg.monitor} has not improved by more than "
                  f"{r.min_delta} for {r.patience} epochs; best epoch {best.epoch}", flush=True)

    loop_seconds = time.perf_counter() - loop_start
    if world > 1:
        torch.distributed.barrier()  # no rank may still be reading the resume checkpoint
    if cfg.resume_path and rank == 0:
        cfg.resume_path.unlink(missing_ok=True)  # done: a forced re-run starts from scratch
    result = _result(rows, best, optim.stopper, cfg, threads, world, amp_dtype, loop_seconds)
    if cfg.train.compile and progress and "first_epoch_excess_seconds" in result.timing:
        t = result.timing
        print(f"train: torch.compile ({cfg.train.compile_mode}) cost about {t['first_epoch_excess_seconds']:.1f} s: the first "
              f"epoch took {t['first_epoch_seconds']:.1f} s, later ones {t['later_epoch_seconds']:.1f} s", flush=True)
    return result


def _placed(model: nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> nn.Module:
    """Move `model` to its device in channels_last (on a CPU too, where oneDNN's convolutions
    take that layout as well); return what runs the forward pass (DDP-wrapped and compiled when
    asked)."""
    model.to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # cuDNN times its algorithms once per input shape and keeps the fastest, as timm's train.py
        # and airbench do (a training step's shapes repeat); GPU runs are not bit-reproducible anyway
        torch.backends.cudnn.benchmark = True
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # frozen parameters (transfer strategies) get no gradient: tell DDP not to wait for them
        forward = DistributedDataParallel(model, find_unused_parameters=cfg.strategy.freezes_parameters)
    if not cfg.train.compile:
        return forward
    return torch.compile(forward, mode=None if cfg.train.compile_mode == "default" else cfg.train.compile_mode)


def set_epoch_mode(model: nn.Module, cfg: TrainConfig, epoch: int, announce: bool = False) -> int:
    """Put `model` in training mode as the strategy says for `epoch`: which parameters train,
    which BatchNorm layers keep their statistics. Returns the number of trainable parameters."""
    trainable = apply_trainable(model, trainable_names(model, cfg.strategy, epoch))
    model.train()
    freeze_batchnorm_stats(model, everywhere=cfg.strategy.frozen_bn_stats)
    if announce:
        frozen_backbone = getattr(model, "frozen_backbone", 0)  # a linear probe's head: the backbone ran once
        what = "linear probe: the head, on cached features" if frozen_backbone else cfg.strategy.name
        print(f"train: epoch {epoch}: {trainable:,} of {sum(p.numel() for p in model.parameters()) + frozen_backbone:,} "
              f"parameters train ({what})", flush=True)
    return trainable


def _as_on_rank_0(amp_dtype: torch.dtype | None, device, world: int) -> torch.dtype | None:
    """The first process's precision for every process (DDP); as is with one process."""
    if world == 1:
        return amp_dtype
    kinds = [None, torch.bfloat16, torch.float16]
    code = torch.tensor([kinds.index(amp_dtype)], device=device)
    torch.distributed.broadcast(code, src=0)
    return kinds[int(code)]


def _summed_over_ranks(loss_sum: float, correct: int, seen: int, device, world: int) -> tuple[float, int, int]:
    """Every rank's share of the epoch, summed (DDP); as is with one process."""
    if world == 1:
        return loss_sum, correct, seen
    totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return float(totals[0]), float(totals[1]), int(totals[2])


def _report_epoch(row: dict, epochs: int, bar, progress: bool) -> None:
    summary = {"loss": f"{row['train_loss']:.4f}", "acc": f"{row['train_accuracy']:.4f}",
               "val_loss": f"{row['val_loss']:.4f}", "val_acc": f"{row['val_accuracy']:.4f}",
               **({"val_map": f"{row['val_map']:.4f}"} if "val_map" in row else {}),
               "img_s": f"{row['images_per_second']:.0f}"}
    if bar.disable and progress:  # not a terminal (CI, a log file): one line per epoch
        print(f"epoch {row['epoch']}/{epochs}: " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    bar.set_postfix(summary)
    bar.close()


def _result(rows: list[dict], best: _Best, stopper: EarlyStopping, cfg: TrainConfig, threads: int,
            world: int, amp_dtype: torch.dtype | None = None, loop_seconds: float = 0.0) -> TrainResult:
    """The summary splits in two: `metrics`, the same for the same inputs (a DVC metric), and
    `timing`, which differs from run to run (kept out of DVC's outputs)."""
    history = pd.DataFrame(rows)
    kept = history.iloc[best.epoch - 1]
    metrics = {"best_val_accuracy": float(kept["val_accuracy"]), "best_val_loss": float(kept["val_loss"]),
               **({"best_val_map": float(kept["val_map"])} if "val_map" in kept else {}),
               "best_epoch": best.epoch, "epochs_run": len(rows),
               "stopped_early": bool(stopper.should_stop and len(rows) < cfg.epochs)}
    seconds = float(sum(r["seconds"] for r in rows))
    timing = {"train_seconds": seconds, "train_images_per_second": sum(r["images"] for r in rows) / seconds,
              "loop_seconds": loop_seconds,  # the epochs with their validation, logging and resume checkpoints
              "threads": threads, "processes": world,
              "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")}
    if rows:
        timing["first_epoch_seconds"] = float(rows[0]["seconds"])  # with torch.compile: compiling included
    if len(rows) > 1:  # the first epoch's excess over the others' images/s, as seconds
        later = sum(r["seconds"] for r in rows[1:]) / sum(r["images"] for r in rows[1:])
        timing["later_epoch_seconds"] = later * rows[0]["images"]
        timing["first_epoch_excess_seconds"] = max(0.0, timing["first_epoch_seconds"] - timing["later_epoch_seconds"])
    logits = best.val_logits.numpy() if best.val_logits is not None else None
    return TrainResult(best.state, best.epoch, history.drop(columns=["seconds", "images"]), metrics, timing, logits)


def train(model: nn.Module, train_xy: tuple[np.ndarray, np.ndarray], val_xy: tuple[np.ndarray, np.ndarray],
          prep: Preprocessing, cfg: TrainConfig, on_epoch: Callable[[int, dict], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Train `model` on prepared uint8 images (N×3×S×S at the preprocessing's stored size)."""
    return fit(model, train_xy[1], image_batches(train_xy, val_xy, prep, cfg), cfg, on_epoch, progress)


def image_batches(train_xy: tuple[np.ndarray, np.ndarray], val_xy: tuple[np.ndarray, np.ndarray],
                  prep: Preprocessing, cfg: TrainConfig) -> ImageBatches:
    """The training images (on the device when `train.data_placement` says so) and the val split."""
    device = torch.device(cfg.device)
    resident = resident_on(device, np.asarray(train_xy[0]).nbytes, cfg.train.data_placement)
    return ImageBatches(train_xy, val_xy, prep, cfg.augment, cfg.augment.resized_crop, device, resident)
