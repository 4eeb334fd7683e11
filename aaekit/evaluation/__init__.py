"""Evaluation: per-epoch validation metrics (``validation``), the paper's metrics of a trained run: Parzen
log-likelihood (``parzen``, §3), classification and clustering errors (``labels``, §5-6), and the clustering
metric itself on plain tensors (``clustering``)."""
