"""Spectra and the KS statistic against scipy and svdvals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from prunenet.selection.prunenet.spectral import (
    LayerSpectrum,
    gram_matrix,
    ks_statistic,
    singular_values_from_gram,
)


@pytest.mark.parametrize("seed", range(5))
def test_ks_equals_scipy_on_random_samples(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=rng.integers(5, 60)), rng.normal(0.3, 1.2, size=rng.integers(5, 60))
    expected = ks_2samp(a, b).statistic
    assert ks_statistic(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, abs=1e-12)


def test_ks_equals_scipy_with_ties():
    a = np.array([1.0, 1.0, 2.0, 2.0, 3.0, 5.0])
    b = np.array([1.0, 2.0, 2.0, 2.0, 4.0])
    assert ks_statistic(torch.tensor(a), torch.tensor(b)) == pytest.approx(
        ks_2samp(a, b).statistic, abs=1e-12
    )
    assert ks_statistic(torch.tensor(a), torch.tensor(a)) == 0.0


@pytest.mark.parametrize("shape,kept", [((120, 40), 90), ((60, 40), 30), ((40, 40), 40)])
def test_gram_singular_values_equal_svdvals(shape, kept):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(*shape, generator=generator)
    rows = torch.randperm(shape[0], generator=generator)[:kept].sort().values
    removed = torch.tensor(sorted(set(range(shape[0])) - set(rows.tolist())), dtype=torch.long)
    fast = singular_values_from_gram(gram_matrix(matrix), matrix, removed, kept)
    slow = torch.linalg.svdvals(matrix[rows].double())
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-8)


def test_layer_spectrum_methods_agree_on_ks():
    generator = torch.Generator().manual_seed(4)
    matrix = torch.randn(200, 48, generator=generator) * torch.linspace(0.1, 3, 48)
    gram, svd = LayerSpectrum(matrix, "gram"), LayerSpectrum(matrix, "svd")
    torch.testing.assert_close(gram.original, svd.original, rtol=1e-4, atol=1e-5)
    for _ in range(20):
        rows = torch.randperm(200, generator=generator)[:130].sort().values
        assert gram.ks(rows) == svd.ks(rows)
