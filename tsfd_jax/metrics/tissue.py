"""Tissue classification metrics of the FDB's tissue head (paper §3.2, the TC branch).

Accuracy, per-tissue recall and precision and the (T, T) confusion matrix (rows: true tissue,
columns: predicted), as plain Python numbers so the result goes straight into report.json.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_tissues: int) -> np.ndarray:
    """(T, T) int64 counts, rows = true tissue index, columns = predicted."""
    true = np.asarray(true, np.int64).reshape(-1)
    pred = np.asarray(pred, np.int64).reshape(-1)
    if true.shape != pred.shape:
        raise ValueError(f"{len(true)} true tissues but {len(pred)} predicted")
    bad = (true < 0) | (true >= num_tissues) | (pred < 0) | (pred >= num_tissues)
    if bad.any():
        raise ValueError(f"tissue indices must lie in [0, {num_tissues}); got "
                         f"{sorted(set(true[bad].tolist()) | set(pred[bad].tolist()))[:5]}")
    return np.bincount(true * num_tissues + pred,
                       minlength=num_tissues * num_tissues).reshape(num_tissues, num_tissues)


def tissue_stats(true: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """true, pred (N,) tissue indices into ``names`` -> accuracy, recall/precision/support per
    tissue ({name: value}, None where undefined), confusion (T x T nested lists), names."""
    names = list(names)
    cm = confusion_matrix(true, pred, len(names))
    diag = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    total = int(cm.sum())
    ratio = lambda a, b: float(a) / float(b) if b else None  # noqa: E731
    return {
        "accuracy": ratio(diag.sum(), total) if total else float("nan"),
        "num_images": total,
        "recall": {n: ratio(diag[i], support[i]) for i, n in enumerate(names)},
        "precision": {n: ratio(diag[i], predicted[i]) for i, n in enumerate(names)},
        "support": {n: int(support[i]) for i, n in enumerate(names)},
        "confusion": cm.tolist(),
        "names": names,
    }
