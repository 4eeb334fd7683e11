"""Any table or image collection as an aaekit dataset: a hub id, a ``save_to_disk`` folder, a Parquet,
CSV/TSV, JSON-lines or Arrow file, a folder of them, or an image folder (one sub-folder per class).

``datasets`` reads the source: format, splits (``train``/``test`` in file or folder names), parsing, image and
class-label columns, and its fingerprinted, memory-mapped Arrow cache (under ``$AAEKIT_CACHE_DIR/datasets``;
hub ids: its own cache). Here each split is read in chunks, checked (columns, types, shapes, NaN, cells that
are not numbers, empty splits), scaled with statistics of the train split only, and written once to
``$AAEKIT_CACHE_DIR/tables/<key>/<split>.arrow``: one record batch ``x`` (float32, or uint8 pixels), ``y``
(int64, -1: unlabelled) that maps into one tensor. The key: every parameter and datasets' fingerprint of every
part.
"""

from __future__ import annotations

import hashlib
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

CONVERTER_VERSION = 3  # bump when the cached layout or the preprocessing changes meaning
# 3: read by `datasets`; text labels numbered in sorted order (its ClassLabel), no longer by first appearance
CHUNK_ROWS = 4096  # rows per chunk checked and converted, and per pandas chunk of a CSV
# Text cells that mean "no value" (as pandas' CSV reader reads them): missing, not bad numbers.
MISSING_TEXTS = ("nan", "-nan", "+nan", "na", "n/a", "null", "none", "#n/a", "<na>")
TABLES = ("csv", "json", "parquet", "arrow")  # read file by file, so that a message gives the row in its file
TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow")  # a path, not a hub id


def resolve_source(source: str) -> Path | None:
    """A local path (``pkg://package/relative/path``: a file inside an installed package), or None for a hub
    id."""
    if source.startswith("pkg://"):  # datasets knows no package-relative paths
        import importlib.util

        package, _, rest = source[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"data.source: no installed package {package!r} for {source!r}; install it or give a path"
            )
        return Path(next(iter(spec.submodule_search_locations))) / rest
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if source.startswith((".", "/", "~")) or path.suffix.lower() in TABLE_SUFFIXES:
        raise UserError(
            f"data.source: {source} does not exist; give an existing file or folder (or a hub id)"
        )
    return None


def read_table(module: str, file: Path, params: dict):
    """One file of a table through datasets' reader and cache; None when it has no rows."""
    import datasets
    import pyarrow as pa

    kwargs = {"cache_dir": str(cache_dir() / "datasets")}
    if module == "csv":
        kwargs.update(
            sep=params["delimiter"] or ("\t" if file.suffix.lower() == ".tsv" else ","),
            comment=params["comment"] or None,
            chunksize=CHUNK_ROWS,
        )

    def build(**extra):
        builder = datasets.load_dataset_builder(module, data_files=str(file), **kwargs, **extra)
        builder.download_and_prepare()
        split = builder.info.splits.get("train")
        return builder.as_dataset("train") if split is not None and split.num_examples else None

    try:
        try:
            return build()
        except datasets.exceptions.DatasetGenerationError as exc:
            if module != "csv" or not isinstance(exc.__cause__, pa.ArrowInvalid):
                raise
        # datasets can't cast a later CSV chunk whose number column holds text: read such columns as text
        # (ours)
        head = build(nrows=CHUNK_ROWS).features
        return build(
            features=datasets.Features(
                {
                    c: datasets.Value("float64" if c == params["label"] else "string")
                    if isinstance(f, datasets.Value) and kind(f.pa_type) == "number"
                    else f
                    for c, f in head.items()
                }
            )
        )
    except Exception as exc:
        cause = exc.__cause__ or exc  # datasets wraps the reader's own error in a DatasetGenerationError
        raise UserError(
            f"{file}: cannot read as {module} ({type(cause).__name__}: {str(cause)[:200]}); check the "
            "file, or set data.format / data.delimiter / data.comment"
        ) from None


def open_source(params: dict, path: Path | None) -> dict[str, list]:
    """``{split: [(where, datasets.Dataset or None)]}``: one part per file for tables, else one per split."""
    import datasets

    fmt, source = params["format"], params["source"]
    try:
        if path is None or fmt == "hub":
            loaded, where = datasets.load_dataset(source, params["config"] or None), f"hub dataset {source}"
        elif (
            path.is_dir()
            and fmt in ("auto", "arrow")
            and any((path / f).exists() for f in ("dataset_dict.json", "state.json"))
        ):
            loaded, where = datasets.load_from_disk(str(path)), str(path)
        else:
            builder = datasets.load_dataset_builder(
                fmt if fmt != "auto" else str(path if path.is_dir() else path.parent),
                data_dir=str(path) if fmt != "auto" and path.is_dir() else None,
                data_files=None if path.is_dir() else [str(path)],
                cache_dir=str(cache_dir() / "datasets"),
            )
            if builder.name in TABLES:
                return {
                    str(s): [(str(f), read_table(builder.name, Path(f), params)) for f in files]
                    for s, files in builder.config.data_files.items()
                }
            builder.download_and_prepare()
            return {
                str(s): [(str(path / s if (path / s).is_dir() else path), d)]
                for s, d in builder.as_dataset().items()
            }
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"data.source: cannot open {source} as {fmt} ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the path or hub id (offline: it must be in the local cache)"
        ) from None
    loaded = {"train": loaded} if isinstance(loaded, datasets.Dataset) else loaded
    return {str(s): [(f"{where} (split {str(s)!r})", d)] for s, d in loaded.items()}


# ---------------------------------------------------------------------------------------------------
# Turning the columns of a chunk into feature vectors.


def kind(t) -> str:
    """An Arrow type as "number", "text", "list", or what it is ("bool", "null: no values", ...)."""
    import pyarrow as pa

    return (
        "number"
        if pa.types.is_integer(t) or pa.types.is_floating(t)
        else "text"
        if pa.types.is_string(t) or pa.types.is_large_string(t)
        else "list"
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        else "null: no values"
        if pa.types.is_null(t)
        else str(t)
    )


def parse_numbers(col) -> tuple[np.ndarray, np.ndarray, int]:
    """A text column read as numbers: float64 values (NaN where a cell is empty, says "no value", or is not a
    number), the mask of the cells that are not numbers, and the count of cells that hold a value."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.utf8_trim_whitespace(col)
    missing = pc.or_(pc.equal(text, ""), pc.is_in(pc.utf8_lower(text), value_set=pa.array(MISSING_TEXTS)))
    missing = (
        np.asarray(pc.fill_null(missing, True).to_numpy(), dtype=bool) if len(col) else np.zeros(0, bool)
    )
    values = np.array(
        pd.to_numeric(pd.Series(text.to_pylist(), dtype=object), errors="coerce"), dtype=np.float64
    )
    values[missing] = np.nan
    return values, np.isnan(values) & ~missing, int((~missing).sum())


def choose_columns(table, features, params: dict, where: str) -> tuple[list[str], set[str], dict | None]:
    """The input columns; those read as numbers (text cells parsed: a column is numbers when most of its cells
    that hold a value are, and a cell that is not is refused or dropped); and, chosen by default, those left
    out."""
    import datasets

    def text_kind(col) -> str:
        _, bad, filled = parse_numbers(col)
        return "empty" if not filled else "numbers" if filled - int(bad.sum()) > filled / 2 else "text"

    names, label = table.column_names, params["label"]
    kinds = {c: kind(table.column(c).type) for c in names}
    kinds = {
        c: text_kind(table.column(c)) if k == "text" else "numbers" if k == "number" else k
        for c, k in kinds.items()
    }
    if params["columns"]:
        for c in params["columns"]:
            if c not in names:
                raise UserError(f"{where}: data.columns: no column {c!r}; columns: {', '.join(names)}")
        return list(params["columns"]), {c for c in params["columns"] if kinds[c] == "numbers"}, None
    if images := [c for c in names if isinstance(features.get(c), datasets.Image)]:
        return (
            images[:1],
            set(),
            {
                c: "the label column"
                if c == label
                else "another image column"
                if c in images
                else "the image column is used"
                for c in names
                if c != images[0]
            },
        )
    left = {
        c: "the label column" if c == label else k for c, k in kinds.items() if k != "numbers" or c == label
    }
    if not (numeric := [c for c in names if c not in left]):
        raise UserError(
            f"{where}: no numeric columns (left out: {describe(left)}); name the input columns in "
            "data.columns"
        )
    return numeric, set(numeric), left


def describe(left: dict) -> str:
    return ", ".join(f"{c} ({why})" for c, why in left.items()) or "none"


def column_values(col, feature, name: str, where: str, params: dict) -> np.ndarray:
    """One input column of a chunk as an (n, *shape) array: numbers, equal-length lists, or images."""
    import datasets

    def stacked(arrays: list, fix: str) -> np.ndarray:
        if len(shapes := {a.shape for a in arrays}) > 1:
            raise UserError(f"{where}: column {name!r} has rows of mixed shapes {sorted(shapes)[:3]}; {fix}")
        return np.stack(arrays) if arrays else np.zeros((0, 1), np.float32)

    if isinstance(feature, datasets.Image):  # datasets decodes it (and converts the mode); resizing is ours
        from PIL import Image

        decoder, size, arrays = (
            datasets.Image(mode=params["image_mode"]),
            tuple(params["image_size"][::-1]),
            [],
        )
        for item in col.to_pylist():  # size: (W, H) for PIL
            if item is None:
                raise UserError(f"{where}: column {name!r} has a missing image; remove that row")
            try:
                img = decoder.decode_example(item)
            except (OSError, ValueError) as exc:
                raise UserError(
                    f"{where}: column {name!r}: cannot decode image {item.get('path') or ''} ({exc})"
                ) from None
            arrays.append(
                np.asarray(img.resize(size, Image.BILINEAR) if size and img.size != size else img, np.uint8)
            )
        return stacked(arrays, "set data.image_size = [H, W] to resize them")
    if (k := kind(col.type)) in ("number", "bool") or k.startswith("decimal"):
        return col.to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    if k == "list":
        try:
            arrays = [np.asarray(r, dtype=np.float32) for r in col.to_pylist()]
        except (ValueError, TypeError):
            raise UserError(
                f"{where}: column {name!r} holds lists of mixed shapes or non-numbers; every row needs "
                "the same shape of numbers"
            ) from None
        return stacked(arrays, "every row needs the same shape")
    raise UserError(
        f"{where}: column {name!r} is not numeric ({col.type}); list only numeric columns in "
        "data.columns (or encode it as numbers)"
    )


def label_values(col, where: str, name: str, classes) -> np.ndarray:
    values, k = col.to_pylist(), kind(col.type)
    if k == "text":  # class names, numbered by the train split's ClassLabel
        try:
            codes = iter(classes.str2int([v for v in values if v is not None]))
        except ValueError as exc:
            raise UserError(
                f"{where}: label column {name!r} has a class that the train split lacks ({exc})"
            ) from None
        return np.asarray([-1 if v is None else next(codes) for v in values], dtype=np.int64)
    if k not in ("number", "bool", "null: no values") or any(
        v is not None and v == v and v % 1 for v in values
    ):
        raise UserError(f"{where}: label column {name!r} must hold integers or class names, found {col.type}")
    out = np.asarray([-1 if v is None or v != v else int(v) for v in values], dtype=np.int64)
    if (out < -1).any():
        raise UserError(
            f"{where}: label column {name!r} has negative labels; use 0..K-1 (-1 or empty: unlabelled)"
        )
    return out


def class_label(parts: list, label: str):
    """The label's classes: its ClassLabel, or one of the split's class names (sorted, as datasets numbers
    them)."""
    import datasets

    parts = [ds for _, ds in parts if ds is not None and label in ds.column_names]
    if parts and isinstance(parts[0].features[label], datasets.ClassLabel):
        return parts[0].features[label]
    if parts and all(
        isinstance(f := ds.features[label], datasets.Value) and kind(f.pa_type) == "text" for ds in parts
    ):
        return datasets.ClassLabel(names=sorted({v for ds in parts for v in ds.unique(label)} - {None}))
    return None


def stage_split(parts: list, params: dict, stage: Path, classes, chosen: dict | None = None) -> dict:
    """Read, check and append one split to raw files ``stage.x``/``stage.y``, mapped back into ``x``/``y`` of
    the description returned. ``chosen``: the train split's description, whose columns the test split uses."""
    import pyarrow as pa

    info = {
        "rows": 0,
        "shape": None,
        "dtype": None,
        "dropped": 0,
        **{k: chosen[k] for k in ("columns", "numbers") if chosen},
    }
    label, missing = params["label"], params["missing"]
    with open(stage.with_suffix(".x"), "wb") as fx, open(stage.with_suffix(".y"), "wb") as fy:
        for where, ds in (p for p in parts if p[1] is not None):
            first_row = 0
            for table in ds.with_format("arrow").iter(batch_size=CHUNK_ROWS):
                # a JSON-typed column (datasets' for mixed JSON values) as its text:
                names = table.column_names
                table = pa.table(
                    {
                        c: pa.chunked_array([a.storage for a in col.chunks])
                        if isinstance(col.type, pa.BaseExtensionType)
                        else col
                        for c, col in zip(names, table.columns)
                    }
                )
                if label and label not in names:
                    raise UserError(f"{where}: data.label: no column {label!r}; columns: {', '.join(names)}")
                if "columns" not in info:
                    info["columns"], numbers, left = choose_columns(table, ds.features, params, where)
                    info["numbers"] = sorted(numbers)
                    if left is not None:  # chosen by default: say what became a feature and what did not
                        info["left_out"] = left
                        print(
                            f"data: features: {', '.join(info['columns'])}; left out: {describe(left)}",
                            flush=True,
                        )
                xs, bad_cells = [], []
                for c in info["columns"]:
                    if c not in names:
                        raise UserError(
                            f"{where}: data.columns: no column {c!r}; columns: {', '.join(names)}"
                        )
                    if kind((col := table.column(c)).type) == "text" and c in info["numbers"]:
                        values, bad, _ = parse_numbers(col)
                        bad_cells += [(int(np.argmax(bad)), c, col)] if bad.any() else []
                        xs.append(values.astype(np.float32)[:, None])
                    else:
                        xs.append(column_values(col, ds.features.get(c), c, where, params))
                if bad_cells and missing != "drop":
                    row, c, col = min(bad_cells, key=lambda cell: cell[0])  # the first bad cell of the chunk
                    value = repr(col[row].as_py())
                    raise UserError(
                        f"{where}: row {first_row + row + 1}, column {c!r}: "
                        f"{value if len(value) <= 40 else value[:37] + '...'} is not a number; clean the "
                        'file, or set data.missing = "drop" to drop the rows with such cells'
                    )
                first_row += table.num_rows
                images = len(xs) == 1 and xs[0].dtype == np.uint8
                x = xs[0] if images else np.concatenate([p.reshape(len(p), -1) for p in xs], axis=1)
                y = label_values(table.column(label), where, label, classes) if label else np.full(len(x), -1)
                if not images and not (finite := np.isfinite(x).all(axis=1)).all():
                    if missing != "drop":
                        bad = next(c for c, p in zip(info["columns"], xs) if not np.isfinite(p).all())
                        raise UserError(
                            f"{where}: column {bad!r} has NaN (missing) or infinite values; clean the "
                            'file or set data.missing = "drop" to skip those rows'
                        )
                    info["dropped"] += int((~finite).sum())
                    x, y = x[finite], y[finite]
                if info["shape"] not in (None, x.shape[1:]):
                    raise UserError(
                        f"{where}: rows of mixed shapes ({info['shape']} then {x.shape[1:]}) in "
                        f"column(s) {', '.join(info['columns'])}; every row needs the same shape"
                    )
                info["shape"], info["dtype"], info["rows"] = x.shape[1:], str(x.dtype), info["rows"] + len(x)
                fx.write(np.ascontiguousarray(x).tobytes())
                fy.write(y.astype(np.int64).tobytes())
    if not (n := info["rows"]):
        after = " after dropping rows with missing values" if info["dropped"] else ""
        raise UserError(
            f"{', '.join(w for w, _ in parts)}: the split is empty{after}; give a source with data in it"
        )
    info["x"] = np.memmap(stage.with_suffix(".x"), info["dtype"], "r", shape=(n, math.prod(info["shape"])))
    info["y"] = np.memmap(stage.with_suffix(".y"), np.int64, "r", shape=(n,))
    return info


# ---------------------------------------------------------------------------------------------------

_prepared: dict[str, dict] = {}


def prepare(params: dict) -> dict:
    """Convert the source once into the cache (or find it there); returns the split files' folder and
    metadata."""
    splits = open_source(params, resolve_source(params["source"]))
    # our settings and datasets' fingerprint of each part (it changes with the source; there is no public
    # getter)
    parts = [(s, w, d._fingerprint if d is not None else None) for s, ps in splits.items() for w, d in ps]
    blob = json.dumps(
        [CONVERTER_VERSION, {k: v for k, v in params.items() if k != "limit"}, parts], default=str
    )
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    if key not in _prepared:
        target = cache_dir() / "tables" / key
        try:
            meta = json.loads((target / "meta.json").read_text())
            if not all((target / f"{s}.arrow").exists() for s in ("train", "test")):
                raise OSError("incomplete")
            report_dropped(meta)  # every run that uses these rows is told that some were dropped
        except (OSError, ValueError):  # no (or a broken) cache entry: converted again, never trusted
            meta = convert(params, splits, target)
        _prepared[key] = {**meta, "dir": str(target)}
    return _prepared[key]


def report_dropped(meta: dict) -> None:
    """Say how many rows each split of the source lost to data.missing = "drop" (nothing when none)."""
    if any((dropped := meta.get("dropped") or {}).values()):
        counts = ", ".join(
            f"{n} of {n + meta['kept'].get(s, 0)} rows of the {s} split" for s, n in dropped.items()
        )
        print(
            f'data: dropped {counts} (missing, infinite or non-numeric values; data.missing = "drop")',
            flush=True,
        )


def convert(params: dict, splits: dict, target: Path) -> dict:
    where, label, test_name = params["source"], params["label"], params["test_split"]
    if params["train_split"] not in splits:
        raise UserError(
            f"data.train_split: {where} has no split {params['train_split']!r}; splits: {', '.join(splits)}"
        )
    train_parts, test_parts = splits[params["train_split"]], splits.get(test_name) if test_name else None
    classes = class_label(train_parts, label) if label else None
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        info = {"train": (train := stage_split(train_parts, params, work / "stage-train", classes))}
        parts = {"train": (train["x"], train["y"], None)}
        if test_parts is not None:
            info["test"] = test = stage_split(test_parts, params, work / "stage-test", classes, train)
            if test["shape"] != train["shape"]:
                raise UserError(
                    f"{test_parts[0][0]}: rows of shape {test['shape']} but the train split has "
                    f"{train['shape']}; both splits need the same shape"
                )
            parts["test"] = (test["x"], test["y"], None)
        else:  # ours, not train_test_split: after our checks dropped rows, and in file order in both parts
            n, n_test = train["rows"], round(params["test_fraction"] * train["rows"])
            if n_test < 1 or n_test >= n:
                raise UserError(
                    f"data.test_fraction: {where} has no split {test_name!r} and {params['test_fraction']}"
                    f" of {n} rows leaves an empty part; change data.test_fraction"
                )
            is_test = np.zeros(n, dtype=bool)
            seeded = torch.Generator().manual_seed(params["split_seed"])
            is_test[torch.randperm(n, generator=seeded)[:n_test].numpy()] = True
            parts = {"train": (train["x"], train["y"], ~is_test), "test": (train["x"], train["y"], is_test)}
        stats = preprocess_stats(parts["train"], params["scale"])
        for split, part in parts.items():
            write_split(work / f"{split}.arrow", *part, stats, work / f"out-{split}")
        max_label = max(int(np.max(y, initial=-1)) for _, y, _ in parts.values())
        meta = {
            "shape": list(train["shape"]),
            "class_names": classes.names if classes else None,
            "num_classes": classes.num_classes
            if classes
            else max_label + 1
            if label and max_label >= 0
            else None,
            "rows": {s: int(len(y) if rows is None else rows.sum()) for s, (_, y, rows) in parts.items()},
            "dropped": {s: i["dropped"] for s, i in info.items()},
            "kept": {s: i["rows"] for s, i in info.items()},
            "columns": train["columns"],
            "left_out": train.get("left_out"),
            "source": where,
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in work.glob("stage-*"):
            f.unlink()
        report_dropped(meta)
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


def chunks(x: np.ndarray, rows: np.ndarray | None):
    for start in range(0, len(x), CHUNK_ROWS * 16):
        chunk = np.asarray(x[start : start + CHUNK_ROWS * 16])
        yield chunk if rows is None else chunk[rows[start : start + CHUNK_ROWS * 16]]


def preprocess_stats(part, scale: str) -> dict | None:
    """Per-feature statistics of the train split (datasets has none), or None when the data is kept as
    stored."""
    x, _, rows = part
    if x.dtype == np.uint8 and scale in ("unit", "none"):
        # pixels stay uint8 for "unit" (the engine scales by 1/255); "none" keeps 0..255 as floats
        return None if scale == "unit" else {"kind": "float"}
    if scale == "none":
        return None
    total, squares, low, high, count = 0.0, 0.0, np.inf, -np.inf, 0
    for chunk in chunks(x, rows):
        chunk = chunk.astype(np.float64)
        total, squares, count = total + chunk.sum(0), squares + (chunk**2).sum(0), count + len(chunk)
        low, high = (
            np.minimum(low, chunk.min(0, initial=np.inf)),
            np.maximum(high, chunk.max(0, initial=-np.inf)),
        )
    if scale == "unit":
        return {
            "kind": "affine",
            "shift": low,
            "scale": np.where(high - low > 0, high - low, 1.0),
            "clip": True,
        }
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return {"kind": "affine", "shift": mean, "scale": np.where(std > 0, std, 1.0), "clip": False}


def write_split(path: Path, x: np.ndarray, y: np.ndarray, rows, stats: dict | None, scratch: Path) -> None:
    """One record batch, not datasets' cache layout (many batches): so that the split maps into one tensor."""
    if stats is None and rows is None:
        return write_arrow(path, x, y)
    out = np.memmap(
        scratch.with_suffix(".x"),
        dtype=x.dtype if stats is None else np.float32,
        mode="w+",
        shape=(len(x) if rows is None else int(rows.sum()), x.shape[1]),
    )
    at = 0
    for chunk in chunks(x, rows):
        if stats is not None and stats["kind"] == "affine":
            chunk = (chunk.astype(np.float64) - stats["shift"]) / stats["scale"]
            # test rows outside the train range: [0, 1]
            chunk = np.clip(chunk, 0.0, 1.0) if stats["clip"] else chunk
        out[at : at + len(chunk)] = chunk
        at += len(chunk)
    out.flush()
    write_arrow(path, out, np.asarray(y) if rows is None else np.asarray(y)[rows])
    del out
    scratch.with_suffix(".x").unlink()


class HFDataset(Dataset):
    """Your own data: a hub id, save_to_disk folder, Parquet/CSV/JSON file or image folder; columns in,
    optional label, scaled to [0, 1] or standardised; cached as memory-mapped Arrow."""

    name = "hf"
    params = {
        "source": Param(
            str,
            help="a hub id, a path (file or folder), or pkg://package/path for a file an "
            "installed package ships",
        ),
        "format": Param(
            str,
            "auto",
            choices=("auto", "csv", "json", "parquet", "arrow", "imagefolder", "hub"),
            help="how to read the source (auto: from the file name or folder)",
        ),
        "config": Param(str, "", help="hub dataset configuration name"),
        "columns": Param(
            list,
            [],
            item=str,
            help="input columns (default: the image column, else every numeric "
            "column but the label; the choice is printed)",
        ),
        "label": Param(str, "", help="label column (integers or class names; empty cells: unlabelled)"),
        "train_split": Param(str, "train", help="the split to train on"),
        "test_split": Param(
            str, "test", help="when the source lacks it, test_fraction of the train rows is held out"
        ),
        "test_fraction": Param(
            float,
            0.2,
            min=0,
            max=1,
            help="share of the train rows held out as the test split when there is none",
        ),
        "split_seed": Param(int, 0, min=0, help="seed of that hold-out"),
        "scale": Param(
            str,
            "unit",
            choices=("unit", "standardize", "none"),
            help="unit: [0, 1] (images /255, columns min-max); standardize: zero mean, unit variance "
            "per feature; statistics from the train split",
        ),
        "flatten": Param(bool, False, help="declare inputs as flat vectors even for images"),
        "image_mode": Param(str, "L", choices=("L", "RGB"), help="images as grey levels or colour"),
        "image_size": Param(
            list, [], item=int, min=1, help="[H, W] to resize images to (required if sizes differ)"
        ),
        "missing": Param(
            str,
            "error",
            choices=("error", "drop"),
            help="rows with NaN values or cells that are not numbers: refuse, or drop them (counted)",
        ),
        "delimiter": Param(str, "", help="CSV field separator (default: ',' or tab for .tsv)"),
        "comment": Param(str, "", help="CSV comment character, e.g. '#'"),
        "limit": Param(int, 0, min=0, help="use only the first N training rows (0: all)"),
    }

    def __init__(self, **params):
        self.settings = self.settings_of(params)
        self.meta = prepare(self.settings)
        self.stored_shape = shape = tuple(self.meta["shape"])
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
