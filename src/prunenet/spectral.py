"""Singular-value spectra and the two-sample Kolmogorov-Smirnov statistic: pure tensor functions.

The reward of PruneNet compares the singular values of a layer's first FFN matrix before and after
rows are removed. Only the values are ever needed (never U and V), and the KS statistic depends only
on their order, so the fast path works from a Gram matrix computed once per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of ``matrix`` (descending), in fp32 at least; the reference computation."""
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    return torch.linalg.svdvals(work)


def gram_matrix(matrix: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``matrix^T matrix`` in ``dtype``; computed once per layer."""
    work = matrix.to(dtype)
    return work.T @ work


def singular_values_from_gram(
    gram: Tensor, matrix: Tensor, removed_rows: Tensor, kept_count: int
) -> Tensor:
    """Singular values of ``matrix`` without ``removed_rows``, from its precomputed Gram matrix.

    ``matrix[kept]^T matrix[kept] = gram - matrix[removed]^T matrix[removed]``: a downdate that
    costs only the removed rows, then one symmetric eigensolve. Returns ``min(kept_count, columns)``
    values, descending, as ``torch.linalg.svdvals`` would on the sliced matrix.
    """
    removed = matrix.index_select(0, removed_rows).to(gram.dtype)
    return singular_values_of_gram(gram - removed.T @ removed, kept_count)


def singular_values_of_gram(gram: Tensor, row_count: int) -> Tensor:
    """The ``min(row_count, columns)`` largest singular values (descending) of a matrix with
    ``row_count`` rows whose Gram matrix is ``gram``: square roots of its eigenvalues."""
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    count = min(row_count, gram.shape[0])
    return eigenvalues.flip(0)[:count].clamp_min(0).sqrt()


def ks_statistic(sample_a: Tensor, sample_b: Tensor) -> float:
    """Two-sample KS statistic ``sup_x |F_a(x) - F_b(x)|`` (``scipy.stats.ks_2samp`` semantics)."""
    a = torch.sort(sample_a.detach().double().flatten()).values
    b = torch.sort(sample_b.detach().double().flatten()).values
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("KS statistic needs two non-empty samples")
    pooled = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, pooled, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, pooled, right=True).double() / b.numel()
    return float((cdf_a - cdf_b).abs().max())


class LayerSpectrum:
    """What the reward needs of one layer: its original spectrum and a way to score a slice.

    ``method="gram"`` (default) works from float64 Gram matrices and a symmetric eigensolver;
    ``method="svd"`` recomputes ``svdvals`` of the sliced matrix in fp32 as the reference does.
    Both give the same KS statistic as float64 ``svdvals`` (tested on random and real matrices).

    ``keep_matrix=False`` (streaming) keeps only the original spectrum: each call then receives
    the layer's first matrix, and the Gram path forms the kept rows' Gram matrix directly instead
    of downdating a cached one, so nothing of size d_model^2 or d_ff * d_model outlives a call.
    """

    def __init__(
        self, first_matrix: Tensor, method: str = "gram", keep_matrix: bool = True
    ) -> None:
        if method not in ("gram", "svd"):
            raise ValueError(f"unknown spectral method {method!r}; use 'gram' or 'svd'")
        self.method = method
        self.matrix = first_matrix if keep_matrix else None
        self.gram = None
        if method == "gram":
            gram = gram_matrix(first_matrix)
            self.original = singular_values_of_gram(gram, first_matrix.shape[0]).float()
            if keep_matrix:
                self.gram = gram
        else:
            self.original = singular_values(first_matrix)

    def sliced(self, kept_rows: Tensor, matrix: Tensor | None = None) -> Tensor:
        """Singular values of the first matrix restricted to ``kept_rows``.

        ``matrix`` is the layer's first matrix; required when the spectrum keeps none.
        """
        matrix = self.matrix if matrix is None else matrix
        if matrix is None:
            raise ValueError("this LayerSpectrum keeps no matrix; pass the layer's first matrix")
        if self.method == "svd":
            return singular_values(matrix.index_select(0, kept_rows))
        kept = kept_rows.numel()
        removed_count = matrix.shape[0] - kept
        if self.gram is None or removed_count > kept:
            # Forming the kept rows' Gram costs ``kept`` rows; the downdate costs the removed ones.
            kept_gram = gram_matrix(matrix.index_select(0, kept_rows))
            return singular_values_of_gram(kept_gram, kept).float()
        keep_mask = torch.ones(matrix.shape[0], dtype=torch.bool, device=matrix.device)
        keep_mask[kept_rows] = False
        removed_rows = keep_mask.nonzero().flatten()
        return singular_values_from_gram(self.gram, matrix, removed_rows, kept).float()

    def ks(self, kept_rows: Tensor, matrix: Tensor | None = None) -> float:
        """KS distance between the original spectrum and that of the slice to ``kept_rows``."""
        return ks_statistic(self.original, self.sliced(kept_rows, matrix))
