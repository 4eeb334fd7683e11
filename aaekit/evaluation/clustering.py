"""Clustering error (§6) in the paper's protocol and two common variants, on plain tensors.

Every variant maps clusters to labels from the *training* split and counts errors on the evaluated
(test) split, so no test label is used to name a cluster:

- ``paper``: cluster i gets the label of the training image with the highest q(y=i|x);
- ``majority``: cluster i gets the most frequent label among the training images assigned to it;
- ``hungarian``: a one-to-one matching of clusters to labels that maximises the training images it gets right
  (the assignment problem, solved by scipy's ``linear_sum_assignment``). With more clusters than classes the
  unmatched clusters name no label, so their images count as errors: the strictest of the three.

A cluster that names no label (-1) makes every image assigned to it an error.
"""

from __future__ import annotations

import torch


def linear_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Minimum-cost assignment of the rows of ``cost`` (n x m, n <= m) to distinct columns: for each row, its
    column (scipy's solver of the assignment problem)."""
    from scipy.optimize import linear_sum_assignment

    n, m = cost.shape
    if n > m:
        raise ValueError(f"linear_assignment needs rows <= columns, got {n} x {m}")
    rows, columns = linear_sum_assignment(cost.double().cpu().numpy())
    return torch.as_tensor(columns[rows.argsort()], dtype=torch.long)


def contingency(assigned: torch.Tensor, labels: torch.Tensor, clusters: int, classes: int) -> torch.Tensor:
    """counts[i, c]: how many examples assigned to cluster i carry label c."""
    flat = assigned.long() * classes + labels.long()
    return torch.bincount(flat, minlength=clusters * classes).reshape(clusters, classes)


def paper_cluster_labels(train_probs: torch.Tensor, train_labels: torch.Tensor) -> torch.Tensor:
    """§6: cluster i takes the label of the training image with the highest q(y=i|x)."""
    return train_labels[train_probs.argmax(dim=0)]


def majority_cluster_labels(
    train_assigned: torch.Tensor, train_labels: torch.Tensor, clusters: int, classes: int
) -> torch.Tensor:
    counts = contingency(train_assigned, train_labels, clusters, classes)
    names = counts.argmax(dim=1)
    return torch.where(counts.sum(dim=1) > 0, names, torch.full_like(names, -1))


def hungarian_cluster_labels(
    train_assigned: torch.Tensor, train_labels: torch.Tensor, clusters: int, classes: int
) -> torch.Tensor:
    counts = contingency(train_assigned, train_labels, clusters, classes)
    names = torch.full((clusters,), -1, dtype=torch.long)
    if clusters <= classes:
        names[:] = linear_assignment(-counts)
    else:  # match every class to a distinct cluster; the other clusters stay unnamed
        names[linear_assignment(-counts.T)] = torch.arange(classes)
    return names


def error_with(names: torch.Tensor, assigned: torch.Tensor, labels: torch.Tensor) -> float:
    """The error rate when every example assigned to cluster i is given the label ``names[i]``."""
    return (names[assigned] != labels).float().mean().item()


def clustering_errors(
    train_probs: torch.Tensor,
    train_labels: torch.Tensor,
    test_probs: torch.Tensor,
    test_labels: torch.Tensor,
    classes: int,
) -> dict[str, float]:
    """The three clustering errors (fractions) of cluster probabilities q(y|x) of shape (n, K)."""
    train_probs, test_probs = train_probs.float().cpu(), test_probs.float().cpu()
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    clusters = train_probs.shape[1]
    train_assigned, test_assigned = train_probs.argmax(dim=1), test_probs.argmax(dim=1)
    return {
        "paper": error_with(paper_cluster_labels(train_probs, train_labels), test_assigned, test_labels),
        "majority": error_with(
            majority_cluster_labels(train_assigned, train_labels, clusters, classes),
            test_assigned,
            test_labels,
        ),
        "hungarian": error_with(
            hungarian_cluster_labels(train_assigned, train_labels, clusters, classes),
            test_assigned,
            test_labels,
        ),
    }
