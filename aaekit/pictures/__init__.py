"""Pictures written into a run directory: decoded prior samples, reconstructions and, for a 2-D code,
the test set's codes over the prior (the paper's Figures 2 and 4). matplotlib is imported here only."""

from __future__ import annotations

from pathlib import Path

import torch


def image_grid(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, H, W) images in [0, 1] -> one (rows*H, cols*W) tensor."""
    h, w = images.shape[-2:]
    images = images[: rows * cols].reshape(rows, cols, h, w)
    return images.permute(0, 2, 1, 3).reshape(rows * h, cols * w)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(str(path), grid.clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)


def is_image(model) -> bool:
    return len(model.input_shape) == 2


@torch.no_grad()
def write_pictures(trainer, run_dir: Path) -> list[Path]:
    model = trainer.model
    written: list[Path] = []
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=trainer.device).manual_seed(0)
    if is_image(model):
        k = model.num_classes or 10
        labels = torch.arange(k, device=trainer.device).repeat(10)  # columns are components/classes
        samples = model.sample(10 * k, labels if model.num_classes else None, generator)
        save_grid(image_grid(samples, 10, k), run_dir / "samples.png")
        written.append(run_dir / "samples.png")

        test = trainer.dataset.load("test")
        from aaekit.data import DeviceData

        data = DeviceData(test, trainer.device)
        index = torch.arange(min(50, len(data)), device=trainer.device)
        x = data.inputs(index)
        codes = model.encoder(x, generator=generator)
        recon = model.to_data_space(model.decoder(model.decoder_input(codes, data.y[index])).float())
        pairs = torch.stack([x, recon], dim=1).reshape(-1, *model.input_shape)  # input beside output
        save_grid(image_grid(pairs, 5, 20), run_dir / "reconstructions.png")
        written.append(run_dir / "reconstructions.png")
    from aaekit.pictures.modes import write_mode_pictures  # style.png, clusters.png, heads' latent.png

    mode_written, has_latent = write_mode_pictures(trainer, run_dir, generator)
    written += mode_written
    path = None if has_latent else write_latent(trainer, run_dir, generator)
    if path:
        written.append(path)
    model.train(was_training)
    return written


def write_latent(trainer, run_dir: Path, generator) -> Path | None:
    model = trainer.model
    two_d = [s for s in model.codes if s.kind == "continuous" and s.dim == 2]
    if not two_d:
        return None
    spec = two_d[0]
    from aaekit.data import DeviceData
    from aaekit.evaluation.validation import encode_split

    data = DeviceData(trainer.dataset.load("test"), trainer.device)
    codes, _, labels = encode_split(model, data)
    z = codes[spec.name].cpu()
    prior = model.priors[spec.name]
    comps = None
    if prior.num_components:
        comps = torch.randint(prior.num_components, (5000,), generator=generator, device=trainer.device)
    prior_z = prior.sample(5000, comps, generator=generator, device=trainer.device).float().cpu()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    axes[0].scatter(prior_z[:, 0], prior_z[:, 1], s=1, c="lightgray", label="prior samples")
    scatter = axes[0].scatter(z[:, 0], z[:, 1], s=1, c=labels.cpu(), cmap="tab10", alpha=0.7)
    axes[0].set_title(f"test codes {spec.name} over prior samples")
    if prior.num_components:
        axes[1].scatter(prior_z[:, 0], prior_z[:, 1], s=1, c=comps.cpu(), cmap="tab10")
        axes[1].set_title("prior samples by component")
    else:
        axes[1].scatter(prior_z[:, 0], prior_z[:, 1], s=1, c="gray")
        axes[1].set_title("prior samples")
    fig.colorbar(scatter, ax=axes, label="label")
    for ax in axes:
        ax.set_aspect("equal")
    path = run_dir / "latent.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
