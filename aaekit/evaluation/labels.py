"""``aaekit eval --metric classification | clustering``: test-set errors of a model's categorical code
(§5 classification error, §6 clustering errors), from a run loaded by ``aaekit.api.load``."""

from __future__ import annotations

from aaekit.errors import UserError


def _encode(run, split: str, limit: int = 0):
    """Codes and labels of a split of the run's dataset, through the same ``encode_split`` as training."""
    from aaekit.contracts import ArrayData
    from aaekit.data import DeviceData
    from aaekit.evaluation.validation import encode_split

    data = run.dataset().load(split)
    if limit:
        data = ArrayData(data.x[:limit], data.y[:limit])
    codes, _, labels = encode_split(run.model, DeviceData(data, run.device))
    return codes, labels


def _categorical_code(run, want_classes: bool) -> str:
    model = run.model
    for spec in model.codes:
        if spec.kind == "categorical" and (not want_classes or spec.dim == model.num_classes):
            return spec.name
    what = (
        f"categorical code with one category per class ({model.num_classes})"
        if want_classes
        else "categorical code"
    )
    raise UserError(
        f"{run.run_dir}: this model has no {what}; that metric needs a recipe that declares one "
        '(e.g. [codes.y] kind = "categorical")'
    )


def default_metric(run) -> str:
    """What `aaekit eval` reports when no --metric is given: the model's own measure of success."""
    model = run.model
    if any(head.has_classification_loss for head in model.heads.values()):
        return "classification"  # §5, and §7 with labels
    if any(spec.kind == "categorical" for spec in model.codes):
        return "clustering"  # §6, and §7 without labels
    return "parzen"  # §3: a generative model of the data


def evaluate_classification(run, test_limit: int = 0) -> tuple[dict, str]:
    """§5: error of argmax q(y|x) against the test labels. Returns (JSON-able result, one-line summary)."""
    name = _categorical_code(run, want_classes=True)
    codes, labels = _encode(run, "test", test_limit)
    predicted = codes[name].argmax(dim=1)
    error = (predicted != labels).float().mean().item()
    result = {
        "metric": "classification",
        "run": str(run.run_dir),
        "code": name,
        "test_examples": len(labels),
        "error": error,
    }
    return result, f"{run.run_dir}: test classification error {100 * error:.2f}% ({len(labels)} images)"


def evaluate_clustering(run, test_limit: int = 0) -> tuple[dict, str]:
    """§6: clusters named from the training split (paper, majority, Hungarian), errors on the test split."""
    from aaekit.evaluation.clustering import clustering_errors

    name = _categorical_code(run, want_classes=False)
    train_codes, train_labels = _encode(run, "train")
    test_codes, test_labels = _encode(run, "test", test_limit)
    errors = clustering_errors(
        train_codes[name], train_labels, test_codes[name], test_labels, run.model.num_classes
    )
    used = int(test_codes[name].argmax(dim=1).unique().numel())
    result = {
        "metric": "clustering",
        "run": str(run.run_dir),
        "code": name,
        "clusters": train_codes[name].shape[1],
        "clusters_used_on_test": used,
        "test_examples": len(test_labels),
        **{f"error.{k}": v for k, v in errors.items()},
    }
    summary = (
        f"{run.run_dir}: test clustering error {100 * errors['paper']:.2f}% (paper protocol), "
        f"{100 * errors['majority']:.2f}% (majority), {100 * errors['hungarian']:.2f}% (Hungarian); "
        f"{used}/{result['clusters']} clusters used"
    )
    return result, summary
