"""Pictures of the label-aware modes, written by ``write_pictures`` where they apply:

- ``style.png`` (§4, the paper's Figure 7): decoder takes the label; rows share one z, columns are the
  classes;
- ``clusters.png`` (§6, Figure 9): one row per cluster of a categorical code, test images assigned to it;
- ``latent.png`` for a head that builds a 2-D decoder input (§7, Figure 10): the test set's W_c·y + z
  coloured by label, with the points the head names as ``landmarks()`` (the cluster heads) marked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aaekit.pictures import image_grid, save_grid


@torch.no_grad()
def write_style(model, run_dir: Path, generator, rows: int = 10) -> Path | None:
    if not (model.label_input and model.num_classes):
        return None
    k, device = model.num_classes, next(model.decoder.parameters()).device
    codes, _ = model.prior_codes(rows, None, generator)  # one style per row ...
    codes = {name: v.repeat_interleave(k, dim=0) for name, v in codes.items()}
    labels = torch.arange(k, device=device).repeat(rows)  # ... and every class along it
    images = model.to_data_space(model.decoder(model.decoder_input(codes, labels)).float())
    path = run_dir / "style.png"
    save_grid(image_grid(images.reshape(-1, *model.input_shape), rows, k), path)
    return path


def test_codes(trainer):
    from aaekit.data import DeviceData
    from aaekit.evaluation.validation import encode_split

    data = DeviceData(trainer.dataset.load("test"), trainer.device)
    codes, _, labels = encode_split(trainer.model, data)
    return data, codes, labels


@torch.no_grad()
def write_clusters(trainer, run_dir: Path, encoded, per_row: int = 20) -> Path | None:
    model = trainer.model
    spec = next((s for s in model.codes if s.kind == "categorical"), None)
    if spec is None:
        return None
    data, codes, _ = encoded
    assigned = codes[spec.name].argmax(dim=1)
    h, w = model.input_shape
    rows = []
    for cluster in range(spec.dim):
        members = (assigned == cluster).nonzero().flatten()[:per_row]
        row = torch.zeros(per_row, h, w, device=data.x.device)  # an empty cluster stays black
        if len(members):
            row[: len(members)] = data.inputs(members).reshape(-1, h, w)
        rows.append(row)
    path = run_dir / "clusters.png"
    save_grid(image_grid(torch.cat(rows), spec.dim, per_row), path)
    return path


@torch.no_grad()
def write_head_latent(trainer, run_dir: Path, encoded) -> Path | None:
    model = trainer.model
    head = next(
        (h for h in model.heads.values() if h.decoder_input_dim == 2 and hasattr(h, "landmarks")), None
    )
    if head is None:
        return None
    _, codes, labels = encoded
    points = head.decoder_input(codes, labels).float().cpu()
    marks = head.landmarks().float().cpu()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    scatter = ax.scatter(points[:, 0], points[:, 1], s=1, c=labels.cpu(), cmap="tab10", alpha=0.6)
    ax.scatter(marks[:, 0], marks[:, 1], s=80, marker="x", c="black", label="cluster heads")
    ax.legend(loc="upper right")
    ax.set_title("test set: W_c·y + z, coloured by label")
    ax.set_aspect("equal")
    fig.colorbar(scatter, ax=ax, label="label")
    path = run_dir / "latent.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_mode_pictures(trainer, run_dir: Path, generator) -> tuple[list[Path], bool]:
    """The pictures above that apply; also says whether latent.png was written (so the generic one is not)."""
    model = trainer.model
    if len(model.input_shape) != 2:
        return [], False
    written = [write_style(model, run_dir, generator)]
    if any(s.kind == "categorical" for s in model.codes) or any(
        h.decoder_input_dim == 2 for h in model.heads.values()
    ):
        encoded = test_codes(trainer)
        written += [write_clusters(trainer, run_dir, encoded), write_head_latent(trainer, run_dir, encoded)]
    latent = run_dir / "latent.png" in written
    return [p for p in written if p is not None], latent
