"""Singular-value spectra and the two-sample Kolmogorov-Smirnov statistic: pure tensor functions.

The reward of PruneNet compares the singular values of a layer's first FFN matrix before and after
rows are removed. Only the values are ever needed (never U and V), and the KS statistic depends only
on their order, so the fast path works from a Gram matrix computed once per layer, in float32 when
the layer is well conditioned enough for float32 to keep that order (see ``float32_is_safe``).

Gram products stay in torch (MKL on CPU): BLAS ``syrk`` through scipy halves their flops, but its
OpenBLAS thread pool competes with torch's OpenMP one; with 2 threads on 2 cores it made a SmolLM2
episode 3.3x slower and gained nothing at the 7B shape (measured, benchmarks/README.md).
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
    work = matrix.detach().to(dtype)
    return work.T @ work


def singular_values_from_gram(
    gram: Tensor, matrix: Tensor, removed_rows: Tensor, kept_count: int
) -> Tensor:
    """Singular values of ``matrix`` without ``removed_rows``, from its precomputed Gram matrix.

    ``matrix[kept]^T matrix[kept] = gram - matrix[removed]^T matrix[removed]``: a downdate that
    costs only the removed rows, then one symmetric eigensolve. Returns ``min(kept_count, columns)``
    values, descending, as ``torch.linalg.svdvals`` would on the sliced matrix.
    """
    removed = matrix.detach().index_select(0, removed_rows).to(gram.dtype)
    return singular_values_of_gram(gram - removed.T @ removed, kept_count)


# A float32 Gram matrix squares the condition number in single precision: the eigenvalue error
# grows with ``n`` and the spacing of the values shrinks with it. Measured (KS of float32 Gram
# slices against float64 svdvals', 18 random slices per case unless stated): equal on 840/840
# slices of the 30 SmolLM2-135M layers (n = 576, condition 16-25); equal up to condition 300 at
# n = 576, 100 at n = 1024 and 60 at n = 2048 on synthetic log-uniform spectra; first different
# at condition 1000 (n = 576), 300 (n = 1024), 100 (n = 2048) and on a 96 x 80 Gaussian matrix
# of condition 413.
# Allowed, with a margin of at least 2 below every measured failure: condition up to 50 for
# n <= 1024, shrinking as 1 / n above (25 at 2048, 12.5 at 4096); a worse-conditioned layer is
# computed in float64.
_FLOAT32_MAX_CONDITION = 50.0


def float32_is_safe(eigenvalues: Tensor, count: int) -> bool:
    """Whether a layer whose Gram eigenvalues (ascending) are ``eigenvalues`` and which has
    ``count`` nonzero singular values is conditioned well enough for the float32 Gram path."""
    values = eigenvalues.flip(0)[:count].double()
    if count == 0 or not bool(values[-1] > 0):
        return False
    limit = _FLOAT32_MAX_CONDITION * min(1.0, 1024 / eigenvalues.numel())
    return float(values[0] / values[-1]) <= limit**2


def singular_values_of_gram(gram: Tensor, row_count: int) -> Tensor:
    """The ``min(row_count, columns)`` largest singular values (descending) of a matrix with
    ``row_count`` rows whose Gram matrix is ``gram``: square roots of its eigenvalues."""
    return _top_singular_values(torch.linalg.eigvalsh(gram), min(row_count, gram.shape[0]))


def _top_singular_values(eigenvalues: Tensor, count: int) -> Tensor:
    """The ``count`` largest square roots (descending) of ascending Gram ``eigenvalues``."""
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


PRECISIONS = ("auto", "float32", "float64")


class LayerSpectrum:
    """What the reward needs of one layer: its original spectrum and a way to score a slice.

    ``method="gram"`` (default) works from Gram matrices and a symmetric eigensolver;
    ``method="svd"`` recomputes ``svdvals`` of the sliced matrix in fp32 as the reference does.
    Both give the same KS statistic as float64 ``svdvals`` (tested on random and real matrices).

    ``precision`` (Gram path only): ``"float64"`` always; ``"float32"`` always (about twice as
    fast); ``"auto"`` (default) float32 when the layer's condition number is within the bound of
    ``float32_is_safe``, float64 otherwise. The choice is made once per layer and kept in
    ``self.dtype``.

    ``keep_matrix=False`` (streaming) keeps only the original spectrum: each call then receives
    the layer's first matrix, and the Gram path forms the kept rows' Gram matrix directly instead
    of downdating a cached one, so nothing of size d_model^2 or d_ff * d_model outlives a call.
    """

    def __init__(
        self,
        first_matrix: Tensor,
        method: str = "gram",
        keep_matrix: bool = True,
        precision: str = "auto",
    ) -> None:
        if method not in ("gram", "svd"):
            raise ValueError(f"unknown spectral method {method!r}; use 'gram' or 'svd'")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown spectral precision {precision!r}; use one of {PRECISIONS}")
        self.method = method
        self.matrix = first_matrix if keep_matrix else None
        self.gram = None
        self.dtype = None
        if method == "svd":
            self.original = singular_values(first_matrix)
            return
        count = min(first_matrix.shape)
        self.dtype = torch.float64 if precision == "float64" else torch.float32
        gram = gram_matrix(first_matrix, self.dtype)
        eigenvalues = torch.linalg.eigvalsh(gram)
        if precision == "auto" and not float32_is_safe(eigenvalues, count):
            self.dtype = torch.float64
            gram = gram_matrix(first_matrix, self.dtype)
            eigenvalues = torch.linalg.eigvalsh(gram)
        self.original = _top_singular_values(eigenvalues, count).float()
        if keep_matrix:
            self.gram = gram

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
            kept_gram = gram_matrix(matrix.index_select(0, kept_rows), self.dtype)
            return singular_values_of_gram(kept_gram, kept).float()
        keep_mask = torch.ones(matrix.shape[0], dtype=torch.bool, device=matrix.device)
        keep_mask[kept_rows] = False
        removed_rows = keep_mask.nonzero().flatten()
        return singular_values_from_gram(self.gram, matrix, removed_rows, kept).float()

    def ks(self, kept_rows: Tensor, matrix: Tensor | None = None) -> float:
        """KS distance between the original spectrum and that of the slice to ``kept_rows``."""
        return ks_statistic(self.original, self.sliced(kept_rows, matrix))
