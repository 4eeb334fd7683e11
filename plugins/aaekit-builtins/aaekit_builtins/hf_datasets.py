"""Any table or image collection as an aaekit dataset: a Hugging Face hub id, a ``save_to_disk`` folder,
Parquet, CSV, JSON lines or an image folder (one sub-folder per class).

The source is read in chunks, checked (columns, types, shapes, NaN, cells that are not numbers, empty
splits), preprocessed with statistics of the training split only, and written once per split to an Arrow
IPC file in the cache, as one record batch: ``x`` (fixed-size list of float32, or uint8 for images in
[0, 1]) and ``y`` (int64, -1 when unlabelled). Loading maps that file into memory, so a split larger than RAM is never read whole; the cache
key covers every parameter and the size and modification time of every source file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from aaekit.contracts import ArrayData, Dataset, cache_dir
from aaekit.errors import UserError
from aaekit.hookspecs import hookimpl
from aaekit.params import Param
from aaekit_builtins.datasets import read_arrow, write_arrow

CONVERTER_VERSION = 2  # bump when the cached layout or the preprocessing changes meaning
# 2: text cells in numeric columns are read as numbers (bad cells refused or dropped); no silent column drops
CHUNK_ROWS = 4096
# Text cells that mean "no value" (as pandas' CSV reader reads them): missing, not bad numbers.
MISSING_TEXTS = ("nan", "-nan", "+nan", "na", "n/a", "null", "none", "#n/a", "<na>")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                ".arrow": "arrow"}


def resolve_source(source: str) -> Path | None:
    """A local path (``pkg://package/relative/path`` for a file shipped inside an installed package),
    or None when ``source`` names a hub dataset."""
    if source.startswith("pkg://"):
        import importlib.util

        package, _, rest = source[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"data.source: no installed package {package!r} for {source!r}; install it or give a path")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if source.startswith((".", "/", "~")) or Path(source).suffix in FILE_FORMATS:
        raise UserError(f"data.source: {source} does not exist; give an existing file or folder (or a hub id)")
    return None


def detect_format(path: Path | None, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path is None:
        return "hub"
    if path.is_file():
        if path.suffix.lower() not in FILE_FORMATS:
            raise UserError(f"data.source: cannot tell the format of {path}; set data.format "
                            "(csv, json, parquet, arrow)")
        return FILE_FORMATS[path.suffix.lower()]
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return "arrow"
    suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
    if suffixes & IMAGE_SUFFIXES:
        return "imagefolder"
    for suffix, name in FILE_FORMATS.items():
        if suffix in suffixes:
            return name
    raise UserError(f"data.source: {path} holds no csv, json, parquet, Arrow or image files")


def source_stamp(path: Path | None) -> list:
    """Size and modification time of every source file: any change gives a new cache key."""
    if path is None:
        return []
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


# ---------------------------------------------------------------------------------------------------
# Reading a source split as a stream of pyarrow tables, whatever the format.

def split_files(path: Path, fmt: str) -> dict[str, list[Path]]:
    """Files per split: a single file is the train split; in a folder, names containing 'test' are test."""
    if path.is_file():
        return {"train": [path]}
    suffixes = [s for s, f in FILE_FORMATS.items() if f == fmt]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    splits: dict[str, list[Path]] = {}
    for f in files:
        name = f.relative_to(path).as_posix().lower()
        splits.setdefault("test" if "test" in name else "train", []).append(f)
    return splits


def image_splits(path: Path) -> dict[str, list[tuple[Path, str]]]:
    """Image folder: optional train/ and test/ folders, each with one sub-folder per class."""
    roots = {s: path / s for s in ("train", "test") if (path / s).is_dir()} or {"train": path}
    out = {}
    for split, root in roots.items():
        out[split] = [(p, p.parent.name if p.parent != root else "")
                      for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    return out


class SourceSplit:
    """One split of the source: ``where`` names it in messages; ``chunks()`` yields pyarrow tables, each with
    the file (or source) it comes from and the 0-based index of its first row there, counted across chunks."""

    def __init__(self, where: str, chunks, class_names: list[str] | None = None):
        self.where, self.chunks, self.class_names = where, chunks, class_names

    def tables(self):
        return (table for table, _, _ in self.chunks())


def numbered(tables, origin: str):
    """``(table, origin, first_row)`` for a stream of tables from one file or source."""
    first = 0
    for table in tables:
        yield table, origin, first
        first += table.num_rows


def arrow_table(frame):
    """A pandas chunk as a pyarrow table; an object column mixing text and numbers (JSON lines) is read as
    text, so that its non-numbers are reported cell by cell instead of failing the whole file."""
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        frame = frame.copy()
        for c in frame.columns[frame.dtypes == object]:
            values = frame[c]
            if values.map(lambda v: isinstance(v, str)).any():
                frame[c] = values.map(lambda v: v if v is None or isinstance(v, str) or (isinstance(v, float) and v != v)
                                      else str(v))
        return pa.Table.from_pandas(frame, preserve_index=False)


def open_source(params: dict, path: Path | None, fmt: str) -> dict[str, SourceSplit]:
    import pyarrow as pa

    if fmt in ("csv", "json", "parquet"):
        def reader(f: Path):
            def tables():
                if fmt == "parquet":
                    import pyarrow.parquet as pq

                    for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS):
                        yield pa.Table.from_batches([batch])
                    return
                import pandas as pd

                if fmt == "csv":
                    sep = params["delimiter"] or ("\t" if f.suffix.lower() == ".tsv" else ",")
                    chunks = pd.read_csv(f, sep=sep, comment=params["comment"] or None, chunksize=CHUNK_ROWS)
                else:
                    chunks = pd.read_json(f, lines=True, chunksize=CHUNK_ROWS)
                for frame in chunks:
                    yield arrow_table(frame)

            def guarded():
                try:
                    yield from numbered(tables(), str(f))
                except (ValueError, OSError, pa.ArrowException) as exc:
                    if isinstance(exc, UserError):
                        raise
                    raise UserError(f"{f}: cannot read as {fmt} ({str(exc)[:200]}); check the file "
                                    "or set data.format / data.delimiter / data.comment") from None
            return guarded

        out = {}
        for split, files in split_files(path, fmt).items():
            readers = [reader(f) for f in files]
            out[split] = SourceSplit(", ".join(map(str, files)),
                                     lambda readers=readers: (t for r in readers for t in r()))
        return out

    if fmt == "imagefolder":
        out = {}
        for split, items in image_splits(path).items():
            names = sorted({c for _, c in items if c})

            def tables(items=items, names=names):
                for start in range(0, len(items), CHUNK_ROWS):
                    part = items[start:start + CHUNK_ROWS]
                    yield pa.table({"image": [{"bytes": None, "path": str(p)} for p, _ in part],
                                    "label": [names.index(c) if c else None for _, c in part]})
            where = str(path / split if split != "train" or (path / "train").is_dir() else path)
            out[split] = SourceSplit(where, lambda tables=tables, where=where: numbered(tables(), where), names or None)
        return out

    import datasets

    try:
        if fmt == "arrow" and path is not None and path.is_file():
            loaded = {"train": datasets.Dataset.from_file(str(path))}
        elif fmt == "arrow":
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(params["source"], params["config"] or None)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"data.source: cannot open {params['source']} as {fmt} ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); check the path or hub id (offline: it must be in the local cache)") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    where = str(path) if path is not None else f"hub dataset {params['source']}"
    out = {}
    for split, ds in loaded.items():
        feature = ds.features.get(params["label"]) if params["label"] else None
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        if ds._indices is not None:  # a selected/shuffled view: materialise its order
            table = ds.with_format("arrow")[:]
        name = f"{where} (split {split!r})"
        out[split] = SourceSplit(name,
                                 lambda table=table, name=name: numbered(
                                     (table.slice(s, CHUNK_ROWS) for s in range(0, table.num_rows, CHUNK_ROWS)), name),
                                 names)
    return out


# ---------------------------------------------------------------------------------------------------
# Turning columns into feature vectors.

def is_image_column(column) -> bool:
    import pyarrow as pa

    t = column.type
    return pa.types.is_struct(t) and {f.name for f in t} >= {"bytes", "path"}


def decode_images(column, params: dict, where: str, name: str) -> np.ndarray:
    from PIL import Image

    size = tuple(params["image_size"][::-1]) if params["image_size"] else None  # PIL wants (W, H)
    arrays = []
    for item in column.to_pylist():
        if item is None:
            raise UserError(f"{where}: column {name!r} has a missing image; remove that row")
        try:
            img = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
            img = img.convert(params["image_mode"])
            if size and img.size != size:
                img = img.resize(size, Image.BILINEAR)
        except (OSError, ValueError) as exc:
            raise UserError(f"{where}: column {name!r}: cannot decode image {item.get('path') or ''} ({exc})") from None
        arrays.append(np.asarray(img, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"{where}: column {name!r} has images of mixed shapes {sorted(shapes)[:3]}; "
                        "set data.image_size = [H, W] to resize them")
    return np.stack(arrays)


def column_values(column, name: str, where: str, params: dict) -> np.ndarray:
    """One input column of a chunk as an (n, *shape) array: numbers, equal-length lists, or images."""
    import pyarrow as pa

    if is_image_column(column):
        return decode_images(column, params, where, name)
    t = column.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        return column.to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        rows = column.to_pylist()
        try:
            arrays = [np.asarray(r, dtype=np.float32) for r in rows]
        except (ValueError, TypeError):
            raise UserError(f"{where}: column {name!r} holds lists of mixed shapes or non-numbers; every "
                            "row needs the same shape of numbers") from None
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise UserError(f"{where}: column {name!r} has rows of mixed shapes {sorted(shapes)[:3]}; "
                            "every row needs the same shape")
        return np.stack(arrays) if arrays else np.zeros((0, 1), np.float32)
    raise UserError(f"{where}: column {name!r} is not numeric ({t}); list only numeric columns in data.columns "
                    "(or encode it as numbers)")


def is_text(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def parse_numbers(column) -> tuple[np.ndarray, np.ndarray, int]:
    """A text column read as numbers: float64 values (NaN where a cell is empty, says "no value", or is not a
    number), the mask of the cells that are not numbers, and the count of cells that hold a value."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.utf8_trim_whitespace(column)
    missing = pc.fill_null(pc.or_(pc.equal(text, ""), pc.is_in(pc.utf8_lower(text), value_set=pa.array(MISSING_TEXTS))),
                           True)
    missing = np.asarray(missing.to_numpy(), dtype=bool) if len(column) else np.zeros(0, bool)
    values = pd.to_numeric(pd.Series(text.to_pylist(), dtype=object), errors="coerce")
    values = np.array(values, dtype=np.float64)  # a copy: the missing cells are set below
    values[missing] = np.nan
    bad = np.isnan(values) & ~missing
    return values, bad, int((~missing).sum())


def text_kind(column) -> str:
    """"numbers" when most cells that hold a value are numbers (a numeric column with some bad cells),
    "text" when most are not, "empty" when none holds a value."""
    _, bad, filled = parse_numbers(column)
    if not filled:
        return "empty"
    return "numbers" if filled - int(bad.sum()) > filled / 2 else "text"


def is_number_column(column) -> bool:
    """Read as one number per row: a numeric type, or text that is mostly numbers."""
    import pyarrow as pa

    t = column.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return True
    return is_text(t) and text_kind(column) == "numbers"


def choose_columns(schema_names: list[str], table, params: dict, where: str) -> tuple[list[str], set[str], dict | None]:
    """The input columns; those read as numbers (text cells in them are parsed, and a cell that is not a
    number is refused or dropped); and, when chosen by default, the columns left out, each with why."""
    import pyarrow as pa

    if params["columns"]:
        for c in params["columns"]:
            if c not in schema_names:
                raise UserError(f"{where}: data.columns: no column {c!r}; columns: {', '.join(schema_names)}")
        columns = list(params["columns"])
        return columns, {c for c in columns if is_number_column(table.column(c))}, None
    label = params["label"]
    left: dict[str, str] = {}
    images = [c for c in schema_names if is_image_column(table.column(c))]
    if images:
        for c in schema_names:
            if c != images[0]:
                left[c] = ("the label column" if c == label else
                           "another image column" if c in images else "the image column is used")
        return images[:1], set(), left
    numeric = []
    for c in schema_names:
        column = table.column(c)
        t = column.type
        if c == label:
            left[c] = "the label column"
        elif pa.types.is_integer(t) or pa.types.is_floating(t):
            numeric.append(c)
        elif is_text(t):
            kind = text_kind(column)
            if kind == "numbers":
                numeric.append(c)
            else:
                left[c] = kind
        else:
            left[c] = "null: no values" if pa.types.is_null(t) else str(t)
    if not numeric:
        raise UserError(f"{where}: no numeric columns (left out: {describe_left_out(left)}); name the input "
                        "columns in data.columns")
    return numeric, set(numeric), left


def describe_left_out(left: dict) -> str:
    return ", ".join(f"{c} ({why})" for c, why in left.items()) or "none"


def shorten(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def label_values(column, where: str, name: str, names: list[str] | None, string_labels: dict) -> np.ndarray:
    import pyarrow as pa

    t = column.type
    values = column.to_pylist()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        # text labels: classes numbered in order of first appearance in the train split
        out = []
        for v in values:
            if v is None:
                out.append(-1)
                continue
            if v not in string_labels:
                if string_labels.get("__frozen__"):
                    raise UserError(f"{where}: label column {name!r} has class {v!r} that the train split lacks")
                string_labels[v] = len(string_labels) - ("__frozen__" in string_labels)
            out.append(string_labels[v])
        return np.asarray(out, dtype=np.int64)
    if not (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_null(t)):
        if pa.types.is_floating(t) and all(v is None or (v == v and float(v).is_integer()) for v in values):
            pass
        else:
            raise UserError(f"{where}: label column {name!r} must hold integers or class names, found {t}")
    out = np.asarray([-1 if v is None or v != v else int(v) for v in values], dtype=np.int64)
    if (out < -1).any():
        raise UserError(f"{where}: label column {name!r} has negative labels; use 0..K-1 (-1 or empty: unlabelled)")
    return out


def stage_split(split: SourceSplit, params: dict, stage: Path, chosen: dict | None = None) -> dict:
    """Read, check and append one split to raw files ``stage.x``/``stage.y``; return its description.
    ``chosen``: the train split's description, whose columns the test split uses."""
    info = {"rows": 0, "shape": None, "dtype": None, "dropped": 0}
    label = params["label"]
    columns, numbers = (chosen["columns"], set(chosen["numbers"])) if chosen else (None, set())
    if chosen:
        info["columns"], info["numbers"] = chosen["columns"], chosen["numbers"]
    string_labels = split.__dict__.setdefault("string_labels", {})
    with open(stage.with_suffix(".x"), "wb") as fx, open(stage.with_suffix(".y"), "wb") as fy:
        for table, origin, first_row in split.chunks():
            if table.num_rows == 0:  # an empty file has no types to check; the empty split is reported below
                continue
            names = table.column_names
            if columns is None:
                columns, numbers, left = choose_columns(names, table, params, split.where)
                info["columns"], info["numbers"] = columns, sorted(numbers)
                if left is not None:  # chosen by default: say what became a feature and what did not
                    info["left_out"] = left
                    print(f"data: features: {', '.join(columns)}; left out: {describe_left_out(left)}", flush=True)
            if label and label not in names:
                raise UserError(f"{split.where}: data.label: no column {label!r}; columns: {', '.join(names)}")
            parts, bad_cells = [], []
            for c in columns:
                if c not in names:
                    raise UserError(f"{split.where}: data.columns: no column {c!r}; columns: {', '.join(names)}")
                column = table.column(c)
                if c in numbers and is_text(column.type):
                    values, bad, _ = parse_numbers(column)
                    if bad.any():
                        bad_cells.append((int(np.argmax(bad)), c, column))
                    parts.append(values.astype(np.float32)[:, None])
                else:
                    parts.append(column_values(column, c, split.where, params))
            if bad_cells and params["missing"] != "drop":
                row, c, column = min(bad_cells, key=lambda cell: cell[0])  # the first bad cell of the chunk
                raise UserError(f"{origin}: row {first_row + row + 1}, column {c!r}: {shorten(column[row].as_py())} "
                                "is not a number; clean the file, or set data.missing = \"drop\" to drop the rows "
                                "with such cells")
            images = len(columns) == 1 and parts[0].dtype == np.uint8
            x = parts[0] if images else np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
            y = (label_values(table.column(label), split.where, label, split.class_names, string_labels)
                 if label else np.full(len(x), -1, np.int64))
            if not images:
                bad_rows = ~np.isfinite(x).all(axis=1)
                if bad_rows.any():
                    if params["missing"] == "drop":
                        info["dropped"] += int(bad_rows.sum())
                        x, y = x[~bad_rows], y[~bad_rows]
                    else:
                        bad = [c for c, p in zip(columns, parts) if not np.isfinite(p.reshape(len(p), -1)).all()]
                        raise UserError(f"{split.where}: column {bad[0]!r} has NaN (missing) or infinite values; "
                                        "clean the file or set data.missing = \"drop\" to skip those rows")
            shape = tuple(x.shape[1:])
            if info["shape"] is None:
                info["shape"], info["dtype"] = shape, str(x.dtype)
            elif info["shape"] != shape:
                raise UserError(f"{split.where}: rows of mixed shapes ({info['shape']} then {shape}) in "
                                f"column(s) {', '.join(columns)}; every row needs the same shape")
            fx.write(np.ascontiguousarray(x).tobytes())
            fy.write(y.tobytes())
            info["rows"] += len(x)
    if not info["rows"]:
        raise UserError(f"{split.where}: the split is empty{' after dropping rows with missing values' if info['dropped'] else ''}; "
                        "give a source with data in it")
    string_labels["__frozen__"] = True  # the test split may only use the train split's classes
    return info


def open_stage(stage: Path, info: dict) -> tuple[np.ndarray, np.ndarray]:
    n, width = info["rows"], math.prod(info["shape"])
    x = np.memmap(stage.with_suffix(".x"), dtype=info["dtype"], mode="r", shape=(n, width))
    y = np.memmap(stage.with_suffix(".y"), dtype=np.int64, mode="r", shape=(n,))
    return x, y


# ---------------------------------------------------------------------------------------------------

_prepared: dict[str, dict] = {}


def conversion_key(params: dict, path: Path | None, fmt: str) -> str:
    relevant = {k: v for k, v in params.items() if k != "limit"}
    blob = json.dumps([CONVERTER_VERSION, relevant, fmt, source_stamp(path)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare(params: dict) -> dict:
    """Convert the source once into the cache (or find it there); returns the split files and metadata."""
    path = resolve_source(params["source"])
    fmt = detect_format(path, params["format"])
    key = conversion_key(params, path, fmt)
    if fmt == "hub":  # a hub dataset may change without a local file: key on its fingerprint too
        key = hashlib.sha256((key + "|" + "|".join(
            s.where for s in open_source(params, path, fmt).values())).encode()).hexdigest()[:20]
    if key in _prepared:
        return _prepared[key]
    target = cache_dir() / "tables" / key
    meta_file = target / "meta.json"
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            if all((target / f"{s}.arrow").exists() for s in ("train", "test")):
                meta["dir"] = str(target)
                _prepared[key] = meta
                report_dropped(meta)  # every run that uses these rows is told that some were dropped
                return meta
        except (OSError, ValueError):
            pass  # a broken cache entry is rebuilt, never trusted
    meta = convert(params, path, fmt, target)
    meta["dir"] = str(target)
    _prepared[key] = meta
    return meta


def report_dropped(meta: dict) -> None:
    """Say how many rows each split of the source lost to data.missing = "drop" (nothing when none)."""
    dropped, kept = meta.get("dropped") or {}, meta.get("kept") or {}
    if not any(dropped.values()):
        return
    counts = ", ".join(f"{n} of {n + kept.get(s, 0)} rows of the {s} split" for s, n in dropped.items())
    print(f"data: dropped {counts} (missing, infinite or non-numeric values; data.missing = \"drop\")", flush=True)


def convert(params: dict, path: Path | None, fmt: str, target: Path) -> dict:
    splits = open_source(params, path, fmt)
    where = str(path) if path is not None else params["source"]
    if params["train_split"] not in splits:
        raise UserError(f"data.train_split: {where} has no split {params['train_split']!r}; "
                        f"splits: {', '.join(splits)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        train_source = splits[params["train_split"]]
        info = {"train": stage_split(train_source, params, work / "stage-train")}
        test_source = splits.get(params["test_split"]) if params["test_split"] else None
        if test_source is not None:
            test_source.__dict__["string_labels"] = train_source.__dict__["string_labels"]
            info["test"] = stage_split(test_source, params, work / "stage-test", info["train"])
            if info["test"]["shape"] != info["train"]["shape"]:
                raise UserError(f"{test_source.where}: rows of shape {info['test']['shape']} but the train split "
                                f"has {info['train']['shape']}; both splits need the same shape")
        x, y = open_stage(work / "stage-train", info["train"])
        parts = {"train": (x, y, None)}
        if test_source is not None:
            tx, ty = open_stage(work / "stage-test", info["test"])
            parts["test"] = (tx, ty, None)
        else:
            # no test split: hold out a seeded fraction of the rows (order kept in both parts)
            n = len(x)
            n_test = int(round(params["test_fraction"] * n))
            if n_test < 1 or n_test >= n:
                raise UserError(f"data.test_fraction: {where} has no split {params['test_split']!r} and "
                                f"{params['test_fraction']} of {n} rows leaves an empty part; change data.test_fraction")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(params["split_seed"])).numpy()
            is_test = np.zeros(n, dtype=bool)
            is_test[perm[:n_test]] = True
            parts = {"train": (x, y, ~is_test), "test": (x, y, is_test)}
        stats = preprocess_stats(parts["train"], params["scale"])
        for split, (sx, sy, rows) in parts.items():
            write_split(work / f"{split}.arrow", sx, sy, rows, stats, work / f"out-{split}")
        shape = tuple(info["train"]["shape"])
        string_labels = {k: v for k, v in train_source.__dict__["string_labels"].items() if k != "__frozen__"}
        names = train_source.class_names or (sorted(string_labels, key=string_labels.get) if string_labels else None)
        max_label = max(int(np.max(sy, initial=-1)) for sx, sy, _ in parts.values())
        num_classes = len(names) if names else (max_label + 1 if params["label"] and max_label >= 0 else None)
        meta = {"shape": list(shape), "num_classes": num_classes, "class_names": names,
                "rows": {s: int(len(p[1]) if p[2] is None else p[2].sum()) for s, p in parts.items()},
                "dropped": {s: i["dropped"] for s, i in info.items()}, "columns": info["train"]["columns"],
                "kept": {s: i["rows"] for s, i in info.items()}, "left_out": info["train"].get("left_out"),
                "dtype": "uint8" if stats is None and info["train"]["dtype"] == "uint8" else "float32",
                "source": where, "format": fmt}
        for f in work.glob("stage-*"):
            f.unlink()
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
        report_dropped(meta)
        del x, y, parts
        try:
            os.replace(work, target)
        except OSError:  # another process finished first: its result is the same
            if not (target / "meta.json").exists():
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return meta


def iter_rows(x: np.ndarray, rows: np.ndarray | None):
    for start in range(0, len(x), CHUNK_ROWS * 16):
        chunk = np.asarray(x[start:start + CHUNK_ROWS * 16])
        yield chunk if rows is None else chunk[rows[start:start + CHUNK_ROWS * 16]]


def preprocess_stats(part, scale: str) -> dict | None:
    """Per-feature statistics of the train split, or None when the data is kept as stored."""
    x, _, rows = part
    if x.dtype == np.uint8 and scale in ("unit", "none"):
        # pixels stay uint8 for "unit" (the engine scales by 1/255); "none" keeps 0..255 as floats
        return None if scale == "unit" else {"kind": "float"}
    if scale == "none":
        return None
    total = np.zeros(x.shape[1]); squares = np.zeros(x.shape[1])  # noqa: E702
    low = np.full(x.shape[1], np.inf); high = np.full(x.shape[1], -np.inf)  # noqa: E702
    count = 0
    for chunk in iter_rows(x, rows):
        chunk = chunk.astype(np.float64)
        total += chunk.sum(0); squares += (chunk ** 2).sum(0); count += len(chunk)  # noqa: E702
        low = np.minimum(low, chunk.min(0, initial=np.inf)); high = np.maximum(high, chunk.max(0, initial=-np.inf))  # noqa: E702
    if scale == "unit":
        span = high - low
        return {"kind": "affine", "shift": low, "scale": np.where(span > 0, span, 1.0), "clip": True}
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return {"kind": "affine", "shift": mean, "scale": np.where(std > 0, std, 1.0), "clip": False}


def write_split(path: Path, x: np.ndarray, y: np.ndarray, rows, stats: dict | None, scratch: Path) -> None:
    if stats is None and rows is None:
        write_arrow(path, x, y)
        return
    n = len(x) if rows is None else int(rows.sum())
    dtype = x.dtype if stats is None else np.float32
    out = np.memmap(scratch.with_suffix(".x"), dtype=dtype, mode="w+", shape=(n, x.shape[1]))
    out_y = np.asarray(y) if rows is None else np.asarray(y)[rows]
    at = 0
    for chunk in iter_rows(x, rows):
        if stats is not None:
            chunk = chunk.astype(np.float64)
            if stats["kind"] == "affine":
                chunk = (chunk - stats["shift"]) / stats["scale"]
                if stats["clip"]:  # test rows outside the train range stay in the declared [0, 1]
                    chunk = np.clip(chunk, 0.0, 1.0)
        out[at:at + len(chunk)] = chunk
        at += len(chunk)
    out.flush()
    write_arrow(path, out, out_y)
    del out
    scratch.with_suffix(".x").unlink()


class HFDataset(Dataset):
    """Your own data: a hub id, save_to_disk folder, Parquet/CSV/JSON file or image folder; columns in,
    optional label, scaled to [0, 1] or standardised; cached as memory-mapped Arrow."""

    name = "hf"
    params = {
        "source": Param(str, help="a hub id, a path (file or folder), or pkg://package/path for a file an "
                                  "installed package ships"),
        "format": Param(str, "auto", choices=("auto", "csv", "json", "parquet", "arrow", "imagefolder", "hub")),
        "config": Param(str, "", help="hub dataset configuration name"),
        "columns": Param(list, [], item=str, help="input columns (default: the image column, else every numeric "
                                                   "column but the label; the choice is printed)"),
        "label": Param(str, "", help="label column (integers or class names; empty cells: unlabelled)"),
        "train_split": Param(str, "train"),
        "test_split": Param(str, "test", help="when the source lacks it, test_fraction of the train rows is held out"),
        "test_fraction": Param(float, 0.2, min=0, max=1),
        "split_seed": Param(int, 0, min=0),
        "scale": Param(str, "unit", choices=("unit", "standardize", "none"),
                       help="unit: [0, 1] (images /255, columns min-max); standardize: zero mean, unit variance "
                            "per feature; statistics from the train split"),
        "flatten": Param(bool, False, help="declare inputs as flat vectors even for images"),
        "image_mode": Param(str, "L", choices=("L", "RGB")),
        "image_size": Param(list, [], item=int, min=1, help="[H, W] to resize images to (required if sizes differ)"),
        "missing": Param(str, "error", choices=("error", "drop"),
                         help="rows with NaN values or cells that are not numbers: refuse, or drop them (counted)"),
        "delimiter": Param(str, "", help="CSV field separator (default: ',' or tab for .tsv)"),
        "comment": Param(str, "", help="CSV comment character, e.g. '#'"),
        "limit": Param(int, 0, min=0, help="use only the first N training rows (0: all)"),
    }

    def __init__(self, **params):
        self.settings = self.settings_of(params)
        self.meta = prepare(self.settings)
        shape = tuple(self.meta["shape"])
        self.stored_shape = shape
        self.input_shape = (math.prod(shape),) if self.settings["flatten"] else shape
        self.num_classes = self.meta["num_classes"]
        self.value_range = self.range_of(self.settings)

    @classmethod
    def settings_of(cls, params: dict) -> dict:
        """This dataset's own keys with defaults filled (the recipe's core data.* keys left out)."""
        if "source" not in params:
            raise UserError("data.source: missing; name a hub dataset, a file or a folder")
        defaults = {k: p.default for k, p in cls.params.items() if not p.required}
        return {**defaults, **{k: v for k, v in params.items() if k in cls.params}}

    @classmethod
    def classes(cls, params: dict) -> int | None:
        if not params.get("label"):
            return None  # without a label column there is nothing to count, and nothing is read
        return prepare(cls.settings_of(params))["num_classes"]

    @classmethod
    def range_of(cls, params: dict) -> tuple[float, float]:
        return (0.0, 1.0) if params.get("scale", "unit") == "unit" else (-math.inf, math.inf)

    def load(self, split: str) -> ArrayData:
        data = read_arrow(Path(self.meta["dir"]) / f"{split}.arrow", self.input_shape)
        if split == "train" and self.settings["limit"]:
            data = ArrayData(data.x[: self.settings["limit"]], data.y[: self.settings["limit"]])
        return data


@hookimpl
def register_datasets(register):
    register(HFDataset)
