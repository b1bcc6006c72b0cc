"""Tests for hm4sr_core.significance: the paired tests against scipy and on identical
arrays, a shuffled pairing found not significant, and the sample standard deviation."""

import numpy as np
import pytest
from scipy import stats

from hm4sr_core.significance import mean_std, paired_test


def test_paired_test():
    gen = np.random.default_rng(0)
    a = gen.random(200)
    b = a - 0.05 - 0.01 * gen.random(200)
    wilcoxon = paired_test(a, b)
    assert wilcoxon["p_value"] < 1e-6 and wilcoxon["n"] == 200
    assert wilcoxon["mean_diff"] == pytest.approx(float(np.mean(a - b)))
    ttest = paired_test(a, b, method="ttest")
    assert ttest["statistic"] == pytest.approx(stats.ttest_rel(a, b).statistic)
    same = paired_test(a, a.copy())
    assert same["p_value"] == 1.0 and same["statistic"] == 0.0
    assert paired_test(a, a.copy(), method="ttest")["p_value"] == 1.0
    noise = paired_test(a, gen.permutation(a))
    assert noise["p_value"] > 1e-3
    with pytest.raises(ValueError, match="one length"):
        paired_test(a, b[:-1])


def test_mean_std_uses_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
