"""Seeds and significance (``docs/evaluation.md``, item 6): mean +- std over seeds and
paired tests between two models' per-user metrics (pure functions).

The per-user arrays come from :mod:`hm4sr_core.metrics` (one value per user, the same
users in the same order for both models); :mod:`hm4sr_core.experiments` applies these to
run folders.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_test(a: np.ndarray, b: np.ndarray, method: str = "wilcoxon") -> dict[str, float]:
    """Paired test between two models' per-user metric arrays (same users, same order).

    ``"wilcoxon"``: Wilcoxon signed-rank (scipy, ``zero_method="wilcox"``: users with
    equal values carry no sign and are dropped); ``"ttest"``: paired t-test. When the
    two arrays are identical the test is undefined; it is reported as
    ``statistic=0, p_value=1``.

    Args:
        a, b: (U,) per-user metric values, U >= 2.
        method: ``"wilcoxon"`` or ``"ttest"``.

    Returns:
        ``{"statistic", "p_value", "mean_diff" (mean of a - b), "n" (U)}``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired_test needs two 1-D arrays of one length, got "
                         f"{a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError(f"paired_test needs at least 2 users, got {a.size}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired_test: values must be finite")
    if method not in ("wilcoxon", "ttest"):
        raise ValueError(f"method must be 'wilcoxon' or 'ttest', got {method!r}")
    # scipy.stats costs about 0.6 s to import; every hm4sr command loads this module, few test
    from scipy import stats

    diff = a - b
    result = {"mean_diff": float(np.mean(diff)), "n": int(a.size)}
    if not np.any(diff):
        return {"statistic": 0.0, "p_value": 1.0, **result}
    if method == "wilcoxon":
        test = stats.wilcoxon(a, b, zero_method="wilcox")
    else:
        test = stats.ttest_rel(a, b)
    return {"statistic": float(test.statistic), "p_value": float(test.pvalue), **result}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) over seeds."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
    return float(np.mean(array)), std
