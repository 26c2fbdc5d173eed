"""Where training images come from, batch by batch: `ImageBatches` holds the prepared uint8
training split (memory-mapped, or resident on the device) and the validation split, and hands
out augmented, normalised batches; the device gets each epoch's indices in one copy."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import predict_logits
from pipeline.core.params import AugmentParams
from pipeline.core.preprocess import Preprocessing
from pipeline.training.augment import augment_batch

DEVICE_BUDGET = 0.25  # `train.data_placement: auto` puts the training images on a GPU when they take at most
                      # this share of its free memory (uint8: CIFAR-10's 50,000 at 32 px are 150 MB)


def resident_on(device: torch.device, nbytes: int, placement: str) -> bool:
    """Whether the training images live on the device for the whole run (`placement`: auto,
    device, host): a batch is then an index into a device tensor, no copy from the host. On a
    CPU, `device` holds them in RAM instead of reading the memory map."""
    if placement != "auto":
        return placement == "device"
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_BUDGET * free


def device_indices(batches: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Each batch's indices on `device`, as slices of one tensor copied there once per epoch:
    a copy from pageable host memory per step would make a GPU wait for the host every step."""
    if not batches:
        return []
    flat = torch.from_numpy(np.concatenate(batches))
    if device.type == "cuda":
        flat = flat.pin_memory()
    return list(torch.split(flat.to(device, non_blocking=True), [len(b) for b in batches]))


def split_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """An epoch's indices (`order`) as its batches of indices."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # BatchNorm cannot train on a batch of one: fold a lone last sample out of the epoch.
    return [b for b in batches if len(b) > 1]


PREFETCH = 2  # host path: batches gathered from the memory map ahead of the one training


class ImageBatches:
    """Training batches of prepared uint8 images, augmented per sample and normalised, and the
    validation split under the evaluation preprocessing (centre crop, normalised). When
    `resident`, the images are a uint8 tensor held on the device and a batch is an index into it;
    otherwise they are gathered from the memory map ahead of time by a background thread (into
    pinned memory and copied on a side stream on a GPU). The same batches either way."""

    def __init__(self, train_xy, val_xy, prep: Preprocessing, augment: AugmentParams, resized: bool, device,
                 resident: bool = False):
        self.x, self.y = train_xy
        self.val_x, self.val_y = val_xy
        self.prep, self.augment, self.resized, self.device = prep, augment, resized, torch.device(device)
        self.resident = torch.from_numpy(np.array(self.x)).to(self.device) if resident else None  # read, not mapped

    def _gather(self, idx: np.ndarray) -> torch.Tensor:
        xb = torch.from_numpy(self.x[idx])
        return xb.pin_memory() if self.device.type == "cuda" else xb  # pinned: copied without the host waiting

    def images(self, idx: np.ndarray) -> torch.Tensor:
        """The uint8 images `idx` (sorted training indices) on the device."""
        if self.resident is not None:
            return self.resident[torch.from_numpy(idx).to(self.device)]
        return self._gather(idx).to(self.device, non_blocking=True)

    def augmented(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        xb = augment_batch(images, self.augment, self.prep.mean, gen, self.prep.image_size, self.resized)
        return self.prep.normalize(xb).contiguous(memory_format=torch.channels_last)

    def batch(self, idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        return self.augmented(self.images(idx), gen)

    def epoch(self, batches: list[np.ndarray], gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(augmented images, their indices on the device) for each batch of sorted indices."""
        at = device_indices(batches, self.device)
        images = (self.resident[i] for i in at) if self.resident is not None else self._streamed(batches)
        for i, xb in zip(at, images):
            yield self.augmented(xb, gen), i

    def _streamed(self, batches: list[np.ndarray]) -> Iterator[torch.Tensor]:
        """The batches' uint8 images on the device, in order: a background thread gathers the
        next PREFETCH from the memory map (numpy copies without holding the GIL) while the
        current one trains; on a GPU the next batch's copy runs on a side stream, and the
        training stream waits for that copy only, not for the host."""
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with ThreadPoolExecutor(1, thread_name_prefix="gather") as pool:
            asked = [pool.submit(self._gather, idx) for idx in batches[:PREFETCH]]
            ready = self._copy(asked[0].result(), side) if batches else None
            for k in range(len(batches)):
                if k + PREFETCH < len(batches):
                    asked.append(pool.submit(self._gather, batches[k + PREFETCH]))
                upcoming = self._copy(asked[k + 1].result(), side) if k + 1 < len(batches) else None
                asked[k] = None
                yield self._arrived(ready)
                ready = upcoming

    def _copy(self, images: torch.Tensor, side) -> tuple[torch.Tensor, object]:
        if side is None:
            return images.to(self.device), None
        with torch.cuda.stream(side):
            on_device = images.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return on_device, done

    def _arrived(self, copied: tuple[torch.Tensor, object]) -> torch.Tensor:
        images, done = copied
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            images.record_stream(stream)  # its memory is not reused while this stream may read it
        return images

    def val_logits(self, model: nn.Module) -> torch.Tensor:
        return torch.from_numpy(predict_logits(model, self.val_x, self.prep))
