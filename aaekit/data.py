"""Data held on the device as one tensor, so a batch is one index operation, and the engine's own seeded
batch order, whose state is part of every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aaekit.contracts import ArrayData
from aaekit.errors import UserError


class ShuffledBatches:
    """An endless sequence of seeded permutations of ``n`` items, taken ``k`` at a time.

    The state (generator state when the current permutation was drawn, and the position in it) is small
    and exact, so a resumed run draws the very same batches.
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("ShuffledBatches needs at least one item")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self._pass_start_state = self.generator.get_state()
        self.perm = torch.randperm(n, generator=self.generator)
        self.position = 0
        self.passes = 0

    def start_pass(self) -> None:
        self._pass_start_state = self.generator.get_state()
        self.perm = torch.randperm(self.n, generator=self.generator)
        self.position = 0
        self.passes += 1

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self.position >= self.n:
                self.start_pass()
            chunk = self.perm[self.position : self.position + k]
            self.position += len(chunk)
            k -= len(chunk)
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> tuple[dict, torch.Tensor]:
        return {"position": self.position, "passes": self.passes}, self._pass_start_state.clone()

    def restore(self, info: dict, generator_state: torch.Tensor) -> None:
        self.generator.set_state(generator_state)
        self._pass_start_state = generator_state.clone()
        self.perm = torch.randperm(self.n, generator=self.generator)
        self.position = int(info["position"])
        self.passes = int(info["passes"])


class DeviceData:
    """A split resident on the device: ``x`` as stored (uint8 pixels stay uint8 until batched)."""

    def __init__(self, data: ArrayData, device: torch.device):
        self.x = data.x.reshape(len(data), -1).to(device)
        self.y = data.y.to(device=device, dtype=torch.long)
        self.scale = 1.0 / 255.0 if self.x.dtype == torch.uint8 else None

    def __len__(self) -> int:
        return self.x.shape[0]

    def inputs(self, index: torch.Tensor) -> torch.Tensor:
        x = self.x[index]
        return x.float().mul_(self.scale) if self.scale is not None else x.float()


class StreamingData:
    """A split left where it lies (e.g. a memory-mapped Arrow file): each batch's rows are gathered on the
    host and only they are copied to the device. Same interface and same values as DeviceData; the batch
    order still comes from the engine's ShuffledBatches, each rank reading only its own slice."""

    def __init__(self, data: ArrayData, device: torch.device):
        self.x = data.x.reshape(len(data), -1)  # a view: nothing is read until a batch needs it
        self.y = data.y.to(device=device, dtype=torch.long)
        self.device = device
        self.scale = 1.0 / 255.0 if self.x.dtype == torch.uint8 else None

    def __len__(self) -> int:
        return self.x.shape[0]

    def inputs(self, index: torch.Tensor) -> torch.Tensor:
        rows = index.cpu()
        # reading rows in file order touches each page once; the inverse permutation restores batch order
        ordered, order = rows.sort()
        x = self.x[ordered][order.argsort()].to(self.device, non_blocking=True)
        return x.float().mul_(self.scale) if self.scale is not None else x.float()


def memory_budget(device: torch.device) -> int:
    """Bytes a split may take on the device: half of what is free, the rest left for the model."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    import psutil

    return psutil.virtual_memory().available // 2


def hold(data: ArrayData, device: torch.device, in_memory="auto", log=print, what: str = "training split"):
    """DeviceData where the split fits (``in_memory`` true, or "auto" within the budget), else StreamingData;
    the choice is logged."""
    size = data.x.numel() * data.x.element_size()
    budget = memory_budget(device) if in_memory == "auto" else None
    resident = in_memory is True or (in_memory == "auto" and size <= budget)
    why = (
        "data.in_memory = true"
        if in_memory is True
        else "data.in_memory = false"
        if in_memory is False
        else f"auto: {size / 2**20:.1f} MiB {'within' if resident else 'over'} the budget "
        f"{budget / 2**20:.0f} MiB"
    )
    log(
        f"data: {what} ({len(data)} x {tuple(data.x.shape[1:])} {str(data.x.dtype).removeprefix('torch.')}) "
        f"{'held on ' + str(device) if resident else 'streamed from host memory/memory-mapped file'} ({why})"
    )
    return DeviceData(data, device) if resident else StreamingData(data, device)


def split_off(data: ArrayData, count: int, seed: int) -> tuple[ArrayData, ArrayData]:
    """Hold out ``count`` random examples (seeded): returns (rest, held_out)."""
    if count <= 0:
        return data, ArrayData(data.x[:0], data.y[:0])
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    held, rest = perm[:count].sort().values, perm[count:].sort().values
    return ArrayData(data.x[rest], data.y[rest]), ArrayData(data.x[held], data.y[held])


def balanced_subset(labels: torch.Tensor, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of ``count`` examples, as equal per class as possible, chosen reproducibly from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    per_class = [count // num_classes + (1 if c < count % num_classes else 0) for c in range(num_classes)]
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class[c]:
            raise ValueError(f"class {c} has only {len(members)} examples, {per_class[c]} requested")
        pick = torch.randperm(len(members), generator=generator)[: per_class[c]]
        chosen.append(members[pick])
    return torch.cat(chosen).sort().values


def labelled_count(setting, n: int) -> int:
    """How many training examples a ``data.labelled`` setting ("all", a count or a fraction) labels."""
    if setting == "all":
        return n
    if isinstance(setting, float):
        return int(round(setting * n))
    return min(int(setting), n)


@dataclass
class TrainingSplits:
    """What a run trains on: the training and validation splits where they are held, and the labelled rows."""

    train: DeviceData | StreamingData
    validation: DeviceData | StreamingData | None
    labelled_index: torch.Tensor  # rows of ``train`` whose label the classification phase may use
    labelled_mask: torch.Tensor  # on the device: whether each row of ``train`` is labelled
    steps_per_epoch: int


def training_splits(
    full_train: ArrayData,
    data: dict,
    batch_size: int,
    num_classes: int | None,
    seed: int,
    device: torch.device,
    recipe_path,
    log=print,
) -> TrainingSplits:
    """The validation split (``data.validation`` images) and the labelled subset (``data.labelled``, balanced
    over the classes) drawn from the run seed; the rest held for training (``data.in_memory``)."""
    if data["validation"] >= len(full_train):
        raise UserError(
            f"{recipe_path}: data.validation: {data['validation']} held out of a training "
            f"split of {len(full_train)} leaves nothing to train on; lower it"
        )
    train, validation = split_off(full_train, data["validation"], seed + 1)
    held = hold(train, device, data["in_memory"], log)
    held_validation = (
        hold(validation, device, data["in_memory"], log, "validation split") if len(validation) else None
    )
    n_train = len(held)
    if n_train < batch_size:
        raise UserError(
            f"{recipe_path}: train.batch_size: {batch_size} is larger than the training set ({n_train})"
        )
    n_labelled = labelled_count(data["labelled"], n_train) if num_classes else 0
    if n_labelled >= n_train:
        labelled_index = torch.arange(n_train)
    elif n_labelled > 0:
        labelled_index = balanced_subset(train.y, n_labelled, num_classes, seed + 2)
    else:
        labelled_index = torch.arange(0)
    mask = torch.zeros(n_train, dtype=torch.bool)
    mask[labelled_index] = True
    return TrainingSplits(held, held_validation, labelled_index, mask.to(device), n_train // batch_size)
