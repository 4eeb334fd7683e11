"""Datasets beyond MNIST: every source format gives the same tensors, the Arrow cache is reused and
invalidated, streaming gives the in-memory batches, bad data is refused by name, and a CSV trains."""

from __future__ import annotations

import json
import math
import os
import textwrap

import numpy as np
import pytest
import torch

from aaekit.data import DeviceData, ShuffledBatches, StreamingData, hold
from aaekit.errors import RecipeError, UserError
from aaekit_builtins.hf_datasets import HFDataset
from aaekit_builtins.toy import Mixture, Rings
from conftest import aaekit


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AAEKIT_CACHE_DIR", str(tmp_path / "cache"))
    import aaekit_builtins.hf_datasets as hf

    monkeypatch.setattr(hf, "_prepared", {})


def table(n: int = 60, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.uniform(-5, 5, size=n),
            "c": rng.integers(0, 100, size=n),
            "label": rng.integers(0, 3, size=n),
        }
    )


def load_both(**params):
    ds = HFDataset(**params)
    return ds, ds.load("train"), ds.load("test")


def test_every_table_format_gives_the_same_tensors(tmp_path):
    import datasets

    frame = table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(tmp_path / "saved"))
    results = [
        load_both(source=str(tmp_path / name), label="label", scale="standardize")
        for name in ("t.csv", "t.parquet", "t.jsonl", "saved")
    ]
    ds, train, test = results[0]
    assert ds.input_shape == (3,) and ds.num_classes == 3 and ds.value_range == (-math.inf, math.inf)
    assert (len(train), len(test)) == (48, 12)
    for _, other_train, other_test in results[1:]:
        torch.testing.assert_close(other_train.x, train.x)
        torch.testing.assert_close(other_test.x, test.x)
        assert torch.equal(other_train.y, train.y) and torch.equal(other_test.y, test.y)
    # standardised with the train split's own statistics
    torch.testing.assert_close(
        train.x.double().mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        train.x.double().std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    # the same rows as the file, in file order; the held-out rows are a seeded choice (split_seed 0)
    raw = torch.tensor(frame[["a", "b", "c"]].to_numpy(), dtype=torch.float64)
    is_test = torch.zeros(60, dtype=torch.bool)
    is_test[torch.randperm(60, generator=torch.Generator().manual_seed(0))[:12]] = True
    rows = raw[~is_test]
    expected = (rows - rows.mean(0)) / rows.std(0, unbiased=False)
    torch.testing.assert_close(train.x.double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(train.y, torch.tensor(frame["label"].to_numpy())[~is_test])
    unit = HFDataset(source=str(tmp_path / "t.csv"), label="label", scale="unit").load("train").x
    assert unit.min() == 0 and unit.max() == 1


def test_images_from_a_folder_and_from_saved_arrow_agree(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8)
    paths, labels = [], []
    for i, img in enumerate(pixels):
        cls = ["cat", "dog"][i % 2]
        folder = tmp_path / "images" / cls
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    for cls in ("cat", "dog"):  # the folder's order: class folders, then file names
        for p in sorted((tmp_path / "images" / cls).glob("*.png")):
            paths.append(str(p))
            labels.append(["cat", "dog"].index(cls))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features).save_to_disk(
        str(tmp_path / "saved")
    )

    folder, f_train, f_test = load_both(source=str(tmp_path / "images"), label="label", test_fraction=0.25)
    saved, s_train, s_test = load_both(source=str(tmp_path / "saved"), label="label", test_fraction=0.25)
    assert folder.input_shape == saved.input_shape == (6, 5) and folder.num_classes == saved.num_classes == 2
    assert f_train.x.dtype == torch.uint8 and f_train.x.shape == (9, 6, 5)
    assert torch.equal(f_train.x, s_train.x) and torch.equal(f_test.x, s_test.x)
    assert torch.equal(f_train.y, s_train.y)
    flat = HFDataset(
        source=str(tmp_path / "images"), label="label", flatten=True, image_size=[3, 4], test_fraction=0.25
    )
    assert flat.input_shape == (12,) and flat.load("train").x.shape == (9, 12)


def test_cache_is_reused_and_invalidated(tmp_path):
    csv = tmp_path / "t.csv"
    table(40).to_csv(csv, index=False)
    first = HFDataset(source=str(csv))
    arrow = os.path.join(first.meta["dir"], "train.arrow")
    stamp = os.stat(arrow).st_mtime_ns
    import aaekit_builtins.hf_datasets as hf

    hf._prepared.clear()  # a new process: only the disk cache is left
    again = HFDataset(source=str(csv))
    assert again.meta["dir"] == first.meta["dir"] and os.stat(arrow).st_mtime_ns == stamp
    assert HFDataset(source=str(csv), scale="standardize").meta["dir"] != first.meta["dir"]
    table(50, seed=2).to_csv(csv, index=False)  # the file changes: a stale cache must not be used
    changed = HFDataset(source=str(csv))
    assert changed.meta["dir"] != first.meta["dir"]
    assert len(changed.load("train")) + len(changed.load("test")) == 50


def test_streaming_gives_the_in_memory_batches(tmp_path):
    from PIL import Image

    csv = tmp_path / "t.csv"
    table(80).to_csv(csv, index=False)
    folder = tmp_path / "img" / "x"
    folder.mkdir(parents=True)
    for i in range(30):
        Image.fromarray(np.full((4, 4), i * 8, dtype=np.uint8)).save(folder / f"{i}.png")
    for source in (csv, tmp_path / "img"):
        data = HFDataset(source=str(source), scale="unit").load("train")
        resident, streamed = DeviceData(data, torch.device("cpu")), StreamingData(data, torch.device("cpu"))
        assert len(resident) == len(streamed)
        a, b = ShuffledBatches(len(resident), seed=5), ShuffledBatches(len(streamed), seed=5)
        for _ in range(7):  # crosses pass boundaries
            ia, ib = a.take(16), b.take(16)
            assert torch.equal(ia, ib)
            assert torch.equal(resident.inputs(ia), streamed.inputs(ib))
            assert torch.equal(resident.y[ia], streamed.y[ib])
    messages = []
    assert isinstance(hold(data, torch.device("cpu"), False, messages.append), StreamingData)
    assert isinstance(hold(data, torch.device("cpu"), "auto", messages.append), DeviceData)
    assert "streamed" in messages[0] and "within the budget" in messages[1]


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    "content, params, words",
    [
        ("a,b\n1,2\n3,4\n", {"columns": ["a", "zz"]}, ["'zz'", "no column"]),
        ("a,b\n1,x\n3,y\n", {"columns": ["a", "b"]}, ["'b'", "not numeric"]),
        ("a,b\n1,2\n,4\n", {}, ["'a'", "NaN"]),
        ("a,b\n", {}, ["empty"]),
        ("a,b\n1,2\n3,4\n", {"label": "lab"}, ["'lab'", "no column"]),
        # a number column with one bad cell is a number column (by default or listed), and the cell is named
        ("a,b\n1,2\nn/a?,4\n3,5\n", {}, ["row 2", "'a'", "'n/a?'", 'data.missing = "drop"']),
        ("a,b\n1,2\n3,4\n5,oops\n", {"columns": ["b"]}, ["row 3", "'b'", "'oops'", 'data.missing = "drop"']),
    ],
)
def test_bad_tables_are_refused_by_name(tmp_path, content, params, words):
    csv = write(tmp_path / "bad.csv", content)
    with pytest.raises(UserError) as caught:
        HFDataset(source=str(csv), **params)
    message = str(caught.value)
    assert str(csv) in message
    for word in words:
        assert word in message


def test_mixed_shapes_are_refused(tmp_path):
    write(tmp_path / "ragged.jsonl", '{"v": [1, 2, 3]}\n{"v": [1, 2]}\n')
    with pytest.raises(UserError, match=r"ragged.jsonl.*'v'.*mixed shapes"):
        HFDataset(source=str(tmp_path / "ragged.jsonl"), columns=["v"])
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "a" / "1.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "imgs" / "a" / "2.png")
    with pytest.raises(UserError, match="mixed shapes.*image_size"):
        HFDataset(source=str(tmp_path / "imgs"))
    # equal-length list columns are vectors; NaN rows can be dropped on request
    write(
        tmp_path / "lists.jsonl",
        '{"v": [1, 2], "w": 1}\n{"v": [3, 4], "w": null}\n{"v": [5, 6], "w": 3}\n'
        '{"v": [7, 8], "w": 4}\n{"v": [9, 0], "w": 5}\n',
    )
    ds = HFDataset(
        source=str(tmp_path / "lists.jsonl"),
        columns=["v", "w"],
        missing="drop",
        scale="none",
        test_fraction=0.25,
    )
    assert ds.input_shape == (3,) and ds.meta["dropped"]["train"] == 1
    assert len(ds.load("train")) + len(ds.load("test")) == 4


def recipe_text(source: str, extra: str = "", output: str = "linear", loss: str = "mse") -> str:
    return textwrap.dedent(f"""
        [data]
        name = "hf"
        source = "{source}"
        label = "label"
        {extra}
        [encoder]
        name = "deterministic"
        hidden = [16]
        [decoder]
        hidden = [16]
        output = "{output}"
        loss = "{loss}"
        [codes.z]
        dim = 2
        [codes.z.prior]
        name = "gaussian"
        [codes.z.discriminator]
        hidden = [16]
        """)


def test_decoder_output_is_checked_against_the_data_range(tmp_path):
    from aaekit.recipe import load_recipe

    csv = tmp_path / "t.csv"
    table().to_csv(csv, index=False)
    bad = write(tmp_path / "bad.toml", recipe_text(csv, 'scale = "standardize"', "sigmoid", "bce"))
    with pytest.raises(RecipeError) as caught:
        load_recipe(bad)
    text = str(caught.value)
    assert 'decoder.output: "sigmoid"' in text and 'output = "linear"' in text
    good = write(tmp_path / "good.toml", recipe_text(csv, 'scale = "unit"', "sigmoid", "bce"))
    assert load_recipe(good).values["data"]["source"] == str(csv)
    toy = write(
        tmp_path / "toy.toml",
        recipe_text(csv)
        .replace('name = "hf"', 'name = "rings"')
        .replace(f'source = "{csv}"\nlabel = "label"', ""),
    )
    assert load_recipe(toy, ["decoder.output=linear"]).values["data"]["name"] == "rings"
    with pytest.raises(RecipeError, match="decoder.output"):
        load_recipe(toy, ["decoder.output=sigmoid"])
    missing = write(tmp_path / "missing.toml", recipe_text(csv, 'columns = ["nope"]'))
    with pytest.raises(RecipeError, match=r"missing.toml: .*'nope'"):
        load_recipe(missing)


def test_toy_datasets_are_seeded_and_labelled():
    mixture = Mixture(components=4, train_size=200, test_size=50, seed=3)
    train = mixture.load("train")
    assert train.x.shape == (200, 2) and set(train.y.tolist()) == {0, 1, 2, 3}
    assert torch.equal(train.x, Mixture(components=4, train_size=200, test_size=50, seed=3).load("train").x)
    assert not torch.equal(mixture.load("test").x, train.x[:50])
    rings = Rings(rings=2, noise=0.0, train_size=100).load("train")
    radius = rings.x.norm(dim=1)
    torch.testing.assert_close(radius, rings.y.float() + 1)


def test_a_csv_trains_streamed_and_evaluates(tmp_path):
    """The user's path through the CLI: a CSV with text labels, streamed (data.in_memory = false); the
    validation split is evaluated at the epoch's end."""
    csv = tmp_path / "mine.csv"
    frame = table(200)
    frame["label"] = frame["label"].map({0: "low", 1: "mid", 2: "high"})  # class names as text
    frame.to_csv(csv, index=False)
    recipe = write(tmp_path / "mine.toml", recipe_text(csv, 'scale = "standardize"\nvalidation = 20'))
    out = tmp_path / "run"
    result = aaekit(
        "run",
        str(recipe),
        "train.batch_size=16",
        "train.max_steps=8",
        "train.log_every=4",
        "data.in_memory=false",
        "train.checkpoint_every=0",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    assert "streamed" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    assert math.isfinite(records[-1]["loss/reconstruction"])
    assert "validation/reconstruction_mse" in records[-1]  # 140 train rows / 16 = 8 steps: one epoch
    assert (out / "model.safetensors").exists() and (out / "latent.png").exists()


def test_mnist_cache_hit_gives_the_idx_files_tensors_without_importing_datasets(tmp_path, monkeypatch):
    """First load converts the idx files into the cache; the second reads the cached Arrow file. Both use
    pyarrow alone (start-up time; a machine without ``datasets`` still trains on local files) and must give
    the very same tensors as the raw files."""
    import subprocess
    import sys

    from aaekit_builtins.datasets import FILES, MNIST, find_local, read_idx

    monkeypatch.setenv("AAEKIT_CACHE_DIR", str(tmp_path / "cache"))
    fresh = MNIST().load("test")
    assert list((tmp_path / "cache" / "mnist").glob("test-*"))
    cached = MNIST().load("test")
    raw_x, raw_y = (read_idx(find_local("") / f) for f in FILES["test"])
    for data in (fresh, cached):
        assert torch.equal(data.x, torch.from_numpy(raw_x.copy())) and torch.equal(
            data.y, torch.from_numpy(raw_y.astype(np.int64))
        )
    probe = (
        "import sys; from aaekit_builtins.datasets import MNIST; d = MNIST().load('test'); "
        "print(len(d), 'datasets' in sys.modules)"
    )
    for cache in ("cache", "cache", "fresh-cache", "fresh-cache"):  # a hit, then a conversion and its hit
        out = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            env={**os.environ, "AAEKIT_CACHE_DIR": str(tmp_path / cache)},
        )
        assert out.stdout.split() == ["10000", "False"], out.stderr[-2000:]
    (cached_file,) = (tmp_path / "fresh-cache" / "mnist").iterdir()
    assert cached_file.name == next((tmp_path / "cache" / "mnist").iterdir()).name

    # A cache cut short (a crash mid-write elsewhere, a full disk) is rebuilt, never trusted; the folder an
    # earlier aaekit wrote for the same split is removed once the new file is in place.
    monkeypatch.setenv("AAEKIT_CACHE_DIR", str(tmp_path / "fresh-cache"))
    cached_file.write_bytes(cached_file.read_bytes()[:1000])
    (legacy := cached_file.with_suffix("")).mkdir()
    (legacy / "data-00000-of-00001.arrow").write_bytes(b"old")
    rebuilt = MNIST().load("test")
    assert torch.equal(rebuilt.x, fresh.x) and torch.equal(rebuilt.y, fresh.y)
    assert cached_file.stat().st_size > 7_000_000 and not legacy.exists()


FEATURES = [f"f{i}" for i in range(13)]


def thirteen_column_csv(path, bad_row: int | None = None, n: int = 60):
    """A table of 13 number columns f0..f12, a text column and a label; ``bad_row`` (0-based) of f7 says
    "n/a?"."""
    import pandas as pd

    rng = np.random.default_rng(4)
    frame = pd.DataFrame({c: rng.normal(size=n).round(4) for c in FEATURES})
    frame.insert(3, "name", [f"item {i}" for i in range(n)])
    frame["label"] = rng.integers(0, 3, size=n)
    if bad_row is not None:
        frame["f7"] = frame["f7"].astype(object)
        frame.loc[bad_row, "f7"] = "n/a?"
    frame.to_csv(path, index=False)
    return path


def features_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("data: features:")]
    assert len(lines) == 1, stdout[-3000:]
    return lines[0]


def two_step_run(recipe, out, *extra: str):
    """Two training steps of a table recipe through the CLI, into ``out``."""
    return aaekit(
        "run",
        str(recipe),
        "train.max_steps=2",
        "train.log_every=1",
        "train.batch_size=16",
        *extra,
        "--output-dir",
        str(out),
    )


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
@pytest.mark.parametrize("bad_row", [4, 40], ids=["first-chunk", "later-chunk"])
def test_a_bad_cell_in_a_number_column_is_refused_by_file_column_row_and_value(
    tmp_path, monkeypatch, bad_row, labelled
):
    """One "n/a?" among numbers: not a silently dropped column but one error naming where and what. With
    small chunks the cell lies in the first chunk (the column reads as text when columns are chosen) or in a
    later one (the column was numbers so far); the row number counts across chunks, from 1 after the
    header."""
    import aaekit_builtins.hf_datasets as hf

    monkeypatch.setattr(hf, "CHUNK_ROWS", 16)
    csv = thirteen_column_csv(tmp_path / "measurements.csv", bad_row)
    text = recipe_text(csv, 'scale = "standardize"')
    recipe = write(tmp_path / "bad.toml", text if labelled else text.replace('label = "label"\n', ""))
    out = tmp_path / "run"
    result = two_step_run(recipe, out)
    assert result.returncode == 2, result.stderr[-3000:] + result.stdout[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert str(csv) in errors[0] and "'f7'" in errors[0] and f"row {bad_row + 1}," in errors[0]
    assert "'n/a?'" in errors[0] and 'data.missing = "drop"' in errors[0]
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert not (out / "model.safetensors").exists()


def test_dropping_bad_cells_keeps_all_features_and_says_how_many_rows_went(tmp_path):
    from aaekit import load

    csv = thirteen_column_csv(tmp_path / "measurements.csv", bad_row=9)
    recipe = write(tmp_path / "drop.toml", recipe_text(csv, 'scale = "standardize"\nmissing = "drop"'))
    out = tmp_path / "run"
    result = two_step_run(recipe, out, "train.checkpoint_every=0")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    line = features_line(result.stdout)
    assert line.startswith(f"data: features: {', '.join(FEATURES)};"), line
    assert "name (text)" in line and "label (the label column)" in line
    assert "data: dropped 1 of 60 rows of the train split" in result.stdout
    assert tuple(load(out).model.input_shape) == (13,)


def test_default_columns_are_named_with_what_was_left_out(tmp_path, capsys):
    """Valid data, columns chosen by default: one line names the features and every column left out, once
    (the cached conversion is not announced again); the numbers are those of the file's number columns."""
    import aaekit_builtins.hf_datasets as hf

    csv = thirteen_column_csv(tmp_path / "t.csv")
    ds = HFDataset(source=str(csv), label="label", scale="none")
    line = features_line(capsys.readouterr().out)
    assert line == f"data: features: {', '.join(FEATURES)}; left out: name (text), label (the label column)"
    assert ds.input_shape == (13,) and ds.meta["left_out"] == {"name": "text", "label": "the label column"}
    import pandas as pd

    frame = pd.read_csv(csv)
    assert np.allclose(
        ds.load("train").x.numpy().sum() + ds.load("test").x.numpy().sum(),
        frame[FEATURES].to_numpy().sum(),
        atol=1e-3,
    )
    hf._prepared.clear()
    assert HFDataset(source=str(csv), label="label", scale="none").meta["dir"] == ds.meta["dir"]
    assert "data: features" not in capsys.readouterr().out
    with pytest.raises(UserError, match=r"column 'name' is not numeric"):  # listed text keeps its error
        HFDataset(source=str(csv), columns=["f0", "name"])


def test_a_folder_of_files_is_split_by_name_and_rows_are_counted_within_each_file(tmp_path, capsys):
    """``datasets`` finds the splits (``train-*.csv``, ``test.csv``); each file is read on its own, so a bad
    cell is named by its file and its row there. Text labels are the train split's classes in sorted order (as
    datasets' ClassLabel numbers them); a test class the train split lacks is refused."""
    folder = tmp_path / "parts"
    folder.mkdir()
    write(folder / "train-00.csv", "a,lab\n1,b\n2,a\n3,b\n")
    write(folder / "train-01.csv", "a,lab\n4,a\nx,a\n6,b\n")
    write(folder / "test.csv", "a,lab\n7,a\n8,\n")
    with pytest.raises(UserError) as caught:
        HFDataset(source=str(folder), label="lab")
    assert str(folder / "train-01.csv") in str(caught.value) and "row 2, column 'a': 'x'" in str(caught.value)
    ds = HFDataset(source=str(folder), label="lab", missing="drop", scale="none")
    assert (
        "data: dropped 1 of 6 rows of the train split, 0 of 2 rows of the test split"
        in capsys.readouterr().out
    )
    train, test = ds.load("train"), ds.load("test")
    assert ds.num_classes == 2 and ds.meta["class_names"] == ["a", "b"]
    assert train.x.ravel().tolist() == [1, 2, 3, 4, 6] and train.y.tolist() == [1, 0, 1, 0, 1]
    assert test.x.ravel().tolist() == [7, 8] and test.y.tolist() == [0, -1]  # an empty label: unlabelled
    write(folder / "test.csv", "a,lab\n7,a\n8,c\n")
    with pytest.raises(
        UserError, match=r"test.csv: label column 'lab' has a class that the train split lacks"
    ):
        HFDataset(source=str(folder), label="lab", missing="drop")


def test_json_values_of_mixed_types_are_cells_of_text(tmp_path):
    """A JSON-lines field holding numbers and text: its text cells are bad numbers, named or dropped."""
    source = write(
        tmp_path / "mixed.jsonl",
        '{"v": 1, "w": 2}\n{"v": "x", "w": 3}\n{"v": 2.5, "w": 3}\n{"v": 3, "w": 4}\n{"v": 4, "w": 5}\n',
    )
    with pytest.raises(UserError, match=r"mixed.jsonl: row 2, column 'v'"):
        HFDataset(source=str(source))
    ds = HFDataset(source=str(source), missing="drop", scale="none", test_fraction=0.25)
    assert ds.input_shape == (2,) and ds.meta["dropped"]["train"] == 1
    rows = torch.cat([ds.load("train").x, ds.load("test").x])
    assert sorted(rows[:, 0].tolist()) == [1, 2.5, 3, 4]
