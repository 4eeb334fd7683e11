"""MNIST from local idx .gz files (or the Hugging Face hub), converted once to an Arrow file in the cache and
held by the engine as one uint8 tensor. The Arrow cache files of every built-in dataset are written and read
here, with pyarrow alone: MNIST's local files never need ``datasets``, which only its hub path imports (the
``hf`` dataset reads every source through ``datasets``, then caches its result with these functions)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from aaekit.contracts import ArrayData, Dataset, cache_dir
from aaekit.errors import UserError
from aaekit.hookspecs import hookimpl
from aaekit.params import Param

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped): big-endian header of dims, then uint8 data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an idx file of unsigned bytes")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
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


def write_arrow(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """One record batch built over the (memory-mapped) arrays, so the file maps back into one tensor."""
    import pyarrow as pa

    n, width = x.shape
    values = pa.Array.from_buffers(
        pa.from_numpy_dtype(x.dtype), n * width, [None, pa.py_buffer(np.ascontiguousarray(x))]
    )
    labels = pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(np.ascontiguousarray(y))])
    batch = pa.record_batch([pa.FixedSizeListArray.from_arrays(values, width), labels], names=["x", "y"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


def read_arrow(path: Path, shape: tuple[int, ...]) -> ArrayData:
    """Memory-map a cached split: x is a view of the file (zero-copy), y a small copy."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    x_col, y_col = table.column("x"), table.column("y")
    x_col = x_col.chunk(0) if x_col.num_chunks == 1 else x_col.combine_chunks()
    with warnings.catch_warnings():  # the mapping is read-only; torch warns about non-writable arrays
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(x_col.flatten().to_numpy(zero_copy_only=False)).reshape(len(table), *shape)
    return ArrayData(x, torch.from_numpy(np.array(y_col.to_numpy(), dtype=np.int64)))


class MNIST(Dataset):
    """MNIST digits, 28x28, 10 classes: local idx .gz files (data.path, AAEKIT_DATA_DIR, ../shared/data/mnist)
    or the Hugging Face hub."""

    name = "mnist"
    input_shape = (28, 28)
    num_classes = 10
    params = {
        "path": Param(
            str,
            "",
            help="folder of the four idx .gz files; default: AAEKIT_DATA_DIR, then ../shared/data/mnist",
        ),
        "source": Param(
            str, "auto", choices=("auto", "local", "hub"), help="auto: local files if found, else the hub"
        ),
        "hub_id": Param(str, "ylecun/mnist", help="the hub dataset read when no local idx files are found"),
        "limit": Param(int, 0, min=0, help="use only the first N training images (0: all)"),
    }

    def load(self, split: str) -> ArrayData:
        data = self._load_full(split)
        if split == "train" and self.limit:
            data = ArrayData(data.x[: self.limit], data.y[: self.limit])
        return data

    def _load_full(self, split: str) -> ArrayData:
        local = find_local(self.path) if self.source != "hub" else None
        if local is None and self.source == "local" or (self.path and local is None):
            where = self.path or "AAEKIT_DATA_DIR or ../shared/data/mnist"
            raise UserError(
                f"data.path: no MNIST idx files ({', '.join(FILES['train'] + FILES['test'])}) in {where}; "
                "point data.path (or AAEKIT_DATA_DIR) at the folder that holds them"
            )
        if local is not None:
            stamp = "|".join(
                f"{f}:{(local / f).stat().st_size}:{(local / f).stat().st_mtime_ns}" for f in FILES[split]
            )
            key = hashlib.sha256(f"{local}|{stamp}".encode()).hexdigest()[:16]
        else:
            key = hashlib.sha256(f"hub|{self.hub_id}".encode()).hexdigest()[:16]
        cached = cache_dir() / "mnist" / f"{split}-{key}.arrow"
        if cached.exists():
            try:
                return read_arrow(cached, self.input_shape)
            except Exception:  # a broken cache is rebuilt, never trusted
                pass
        if local is not None:
            images, labels = (read_idx(local / f) for f in FILES[split])
            if images.shape[0] != labels.shape[0]:
                raise UserError(
                    f"{local}: {FILES[split][0]} has {images.shape[0]} images but "
                    f"{FILES[split][1]} has {labels.shape[0]} labels"
                )
        else:
            images, labels = self._from_hub(split)
        labels = labels.astype(np.int64)
        tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_arrow(tmp, images.reshape(len(images), -1), labels)
            os.replace(tmp, cached)
            # the folder an earlier aaekit wrote with ``datasets``' save_to_disk
            legacy = cached.with_suffix("")
            if legacy.is_dir():
                shutil.rmtree(legacy, ignore_errors=True)
        except OSError:  # a read-only cache only costs the conversion next time
            tmp.unlink(missing_ok=True)
        return ArrayData(torch.from_numpy(np.array(images, copy=True)), torch.from_numpy(labels))

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
