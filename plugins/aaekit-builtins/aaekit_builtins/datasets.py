"""MNIST from local idx .gz files (or the Hugging Face hub), converted once to an Arrow file in the cache (the
layout of ``datasets``' ``save_to_disk``) and held by the engine as one uint8 tensor."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from aaekit.contracts import ArrayData, Dataset
from aaekit.errors import UserError
from aaekit.hookspecs import hookimpl
from aaekit.params import Param

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("AAEKIT_CACHE_DIR") or Path.home() / ".cache" / "aaekit")


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped): big-endian header of dims, then uint8 data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an idx file of unsigned bytes")
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise ValueError(f"expected {int(np.prod(dims))} values, found {data.size}")
        return data.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: corrupt or unreadable MNIST file ({exc}); download it again") from None


def default_locations() -> list[Path]:
    here = Path(__file__).resolve()
    return [Path.cwd() / ".." / "shared" / "data" / "mnist"] + [
        parent / ".." / "shared" / "data" / "mnist" for parent in here.parents[:4]
    ]


def find_local(path: str) -> Path | None:
    candidates = [Path(path)] if path else []
    if not path and os.environ.get("AAEKIT_DATA_DIR"):
        env = Path(os.environ["AAEKIT_DATA_DIR"])
        candidates += [env / "mnist", env]
    if not path:
        candidates += default_locations()
    for c in candidates:
        if all((c / f).exists() for f in FILES["train"] + FILES["test"]):
            return c.resolve()
    return None


def to_arrow(images: np.ndarray, labels: np.ndarray):
    """One Arrow table: the pixels of each image as a fixed-size list, and its label."""
    import pyarrow as pa

    pixels = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), images[0].size)
    return pa.table({"image": pixels, "label": pa.array(labels.astype(np.int64))})


def write_saved(table, folder: Path) -> None:
    """The table as one Arrow IPC stream in ``folder``, the file layout ``save_to_disk`` writes, with pyarrow
    alone: local files then never need ``datasets`` (which only the hub path imports)."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    with pa.ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)


def read_saved(folder: Path):
    """The table of a folder that ``datasets``' ``save_to_disk`` wrote (Arrow IPC streams), read with pyarrow
    alone: importing ``datasets`` would add about half a second to every run's start-up."""
    import pyarrow as pa

    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise ValueError(f"{folder}: no data-*.arrow files")
    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(f), "r")).read_all() for f in files])


def from_arrow(table, shape) -> ArrayData:
    pixels = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    labels = table.column("label").to_numpy()
    # A copy: the Arrow buffer may be a read-only memory map, which torch must not wrap (45 MiB for MNIST).
    x = torch.from_numpy(np.array(pixels, copy=True).reshape(len(labels), *shape))
    return ArrayData(x, torch.from_numpy(np.array(labels, dtype=np.int64)))  # a writable copy (small)


class MNIST(Dataset):
    """MNIST digits, 28x28, 10 classes: local idx .gz files (data.path, AAEKIT_DATA_DIR, ../shared/data/mnist)
    or the Hugging Face hub."""

    name = "mnist"
    input_shape = (28, 28)
    num_classes = 10
    params = {
        "path": Param(str, "", help="folder of the four idx .gz files; default: AAEKIT_DATA_DIR, then ../shared/data/mnist"),
        "source": Param(str, "auto", choices=("auto", "local", "hub"), help="auto: local files if found, else the hub"),
        "hub_id": Param(str, "ylecun/mnist"),
        "limit": Param(int, 0, min=0, help="use only the first N training images (0: all)"),
    }

    def __init__(self, path: str = "", source: str = "auto", hub_id: str = "ylecun/mnist", limit: int = 0):
        self.path, self.source, self.hub_id, self.limit = path, source, hub_id, limit

    def load(self, split: str) -> ArrayData:
        data = self._load_full(split)
        if split == "train" and self.limit:
            data = ArrayData(data.x[: self.limit], data.y[: self.limit])
        return data

    def _load_full(self, split: str) -> ArrayData:
        local = find_local(self.path) if self.source != "hub" else None
        if local is None and self.source == "local" or (self.path and local is None):
            where = self.path or "AAEKIT_DATA_DIR or ../shared/data/mnist"
            raise UserError(f"data.path: no MNIST idx files ({', '.join(FILES['train'] + FILES['test'])}) in {where}; "
                            "point data.path (or AAEKIT_DATA_DIR) at the folder that holds them")
        if local is not None:
            stamp = "|".join(f"{f}:{(local / f).stat().st_size}:{(local / f).stat().st_mtime_ns}" for f in FILES[split])
            key = hashlib.sha256(f"{local}|{stamp}".encode()).hexdigest()[:16]
        else:
            key = hashlib.sha256(f"hub|{self.hub_id}".encode()).hexdigest()[:16]
        cached = cache_dir() / "mnist" / f"{split}-{key}"
        if cached.exists():
            try:
                return from_arrow(read_saved(cached), self.input_shape)
            except Exception:  # a broken cache is rebuilt, never trusted
                pass
        if local is not None:
            images, labels = (read_idx(local / f) for f in FILES[split])
            if images.shape[0] != labels.shape[0]:
                raise UserError(f"{local}: {FILES[split][0]} has {images.shape[0]} images but "
                                f"{FILES[split][1]} has {labels.shape[0]} labels")
        else:
            images, labels = self._from_hub(split)
        table = to_arrow(images, labels)
        tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
        try:
            write_saved(table, tmp)
            os.replace(tmp, cached)
        except OSError:  # a read-only cache only costs the conversion next time
            shutil.rmtree(tmp, ignore_errors=True)
        return from_arrow(table, self.input_shape)

    def _from_hub(self, split: str):
        import datasets

        try:
            ds = datasets.load_dataset(self.hub_id, split=split)
        except Exception as exc:
            raise UserError(
                f"data: MNIST not found locally and the hub failed ({type(exc).__name__}: {str(exc)[:200]}); "
                "set data.path or AAEKIT_DATA_DIR to a folder with the idx .gz files"
            ) from None
        images = np.stack([np.asarray(img, dtype=np.uint8) for img in ds["image"]])
        return images, np.asarray(ds["label"], dtype=np.int64)


@hookimpl
def register_datasets(register):
    register(MNIST)
