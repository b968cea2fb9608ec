"""The fast spectral engine gives the same values and the same KS as float64 svdvals; the
benchmark's reference re-implementation scores kept rows exactly as prunenet does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from prunenet.families import kept_count
from prunenet.spectral import LayerSpectrum, ks_statistic

_SPEC = importlib.util.spec_from_file_location(
    "reference_impl", Path(__file__).resolve().parents[1] / "benchmarks" / "reference_impl.py")
reference_impl = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reference_impl)


def svdvals64(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


def random_matrix(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Gaussian rows with a spread of column scales, so the spectrum is far from flat."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 0.5, columns)
    return torch.randn(rows, columns, generator=generator) * scales


def row_sets(d_ff: int, ratio: float, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    kept = kept_count(d_ff, ratio)
    return [torch.randperm(d_ff, generator=generator)[:kept].sort().values for _ in range(count)]


def assert_fast_equals_svdvals(matrix: torch.Tensor, rows: list[torch.Tensor]) -> None:
    reference_original = svdvals64(matrix)
    cached = LayerSpectrum(matrix, "gram")  # downdates a cached Gram matrix
    streamed = LayerSpectrum(matrix, "gram", keep_matrix=False)  # forms the kept rows' Gram
    torch.testing.assert_close(cached.original.double(), reference_original, rtol=2e-5,
                               atol=1e-6)
    assert torch.equal(cached.original, streamed.original)
    for kept_rows in rows:
        expected_values = svdvals64(matrix[kept_rows])
        expected_ks = ks_statistic(reference_original, expected_values)
        for spectrum in (cached, streamed):
            values = spectrum.sliced(kept_rows, matrix)
            torch.testing.assert_close(values.double(), expected_values, rtol=2e-5, atol=1e-6)
            assert spectrum.ks(kept_rows, matrix) == expected_ks


@pytest.mark.parametrize("shape,ratio", [((192, 64), 0.3), ((192, 64), 0.7), ((96, 80), 0.2),
                                         ((300, 48), 0.5)])
def test_fast_path_equals_float64_svdvals_on_random_matrices(shape, ratio):
    matrix = random_matrix(*shape, seed=shape[0] + shape[1])
    assert_fast_equals_svdvals(matrix, row_sets(shape[0], ratio, count=10, seed=1))


def test_streamed_spectrum_needs_the_matrix():
    spectrum = LayerSpectrum(random_matrix(20, 8, 0), keep_matrix=False)
    assert spectrum.matrix is None and spectrum.gram is None
    with pytest.raises(ValueError, match="pass the layer's first matrix"):
        spectrum.sliced(torch.arange(10))


@pytest.mark.parametrize("shape,ratio", [((192, 64), 0.3), ((120, 40), 0.5)])
def test_reference_reimplementation_scores_rows_like_prunenet(shape, ratio):
    matrix = random_matrix(*shape, seed=7)
    original = reference_impl.full_svd_values(matrix)
    spectrum = LayerSpectrum(matrix)
    for kept_rows in row_sets(shape[0], ratio, count=10, seed=3):
        # Equal orderings; the two formulas may round the same fraction differently (1e-17).
        assert reference_impl.reference_ks(original, matrix[kept_rows]) == pytest.approx(
            spectrum.ks(kept_rows), abs=1e-12)


@pytest.fixture(scope="module")
def smollm2_first_matrices():
    from safetensors import safe_open

    from prunenet.assets import smollm2_path
    from prunenet.errors import MissingAssetError

    try:
        folder = smollm2_path()
    except MissingAssetError as error:
        pytest.skip(str(error))
    matrices = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for layer in (0, 29):
                name = f"model.layers.{layer}.mlp.gate_proj.weight"
                if name in handle.keys():
                    matrices[layer] = handle.get_tensor(name).float()
    assert sorted(matrices) == [0, 29]
    return matrices


@pytest.mark.real
@pytest.mark.parametrize("layer", [0, 29])
def test_fast_path_equals_float64_svdvals_on_smollm2(smollm2_first_matrices, layer):
    matrix = smollm2_first_matrices[layer]
    assert matrix.shape == (1536, 576)
    rows = row_sets(1536, 0.3, count=4, seed=layer) + row_sets(1536, 0.7, count=2, seed=layer)
    assert_fast_equals_svdvals(matrix, rows)


@pytest.mark.real
def test_reference_scores_smollm2_rows_like_prunenet(smollm2_first_matrices):
    matrix = smollm2_first_matrices[29]
    original = reference_impl.full_svd_values(matrix)
    spectrum = LayerSpectrum(matrix)
    for kept_rows in row_sets(1536, 0.3, count=3, seed=11):
        # Equal orderings; the two formulas may round the same fraction differently (1e-17).
        assert reference_impl.reference_ks(original, matrix[kept_rows]) == pytest.approx(
            spectrum.ks(kept_rows), abs=1e-12)
