"""The fast spectral engine gives the same values and the same KS as float64 svdvals; the
benchmark's reference re-implementation scores kept rows exactly as prunenet does."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from prunenet.families import kept_count
from prunenet.selection.prunenet.spectral import LayerSpectrum, ks_statistic

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


def assert_fast_equals_svdvals(
    matrix: torch.Tensor, rows: list[torch.Tensor], precisions=("auto", "float32", "float64")
) -> None:
    """Every precision, cached (downdate) and streamed (kept rows' Gram), gives float64 svdvals'
    values (to float32's accuracy on a Gram matrix) and exactly its KS statistic."""
    reference_original = svdvals64(matrix)
    condition = float(reference_original[0] / reference_original[-1])
    for precision in precisions:
        cached = LayerSpectrum(matrix, "gram", precision=precision)  # downdates a cached Gram
        streamed = LayerSpectrum(matrix, "gram", keep_matrix=False, precision=precision)
        assert cached.dtype == streamed.dtype
        # Gram eigenvalues carry an absolute error of about eps * sigma_max^2, so a singular
        # value's relative error grows with (sigma_max / sigma)^2.
        rtol = 2e-5 if cached.dtype == torch.float64 else 2e-5 * condition**2
        torch.testing.assert_close(cached.original.double(), reference_original, rtol=rtol,
                                   atol=1e-6)
        assert torch.equal(cached.original, streamed.original)
        for kept_rows in rows:
            expected_values = svdvals64(matrix[kept_rows])
            expected_ks = ks_statistic(reference_original, expected_values)
            for spectrum in (cached, streamed):
                values = spectrum.sliced(kept_rows, matrix)
                torch.testing.assert_close(values.double(), expected_values, rtol=rtol,
                                           atol=1e-6)
                assert spectrum.ks(kept_rows, matrix) == expected_ks, (precision, kept_rows)


@pytest.mark.parametrize("shape,ratio", [((192, 64), 0.3), ((192, 64), 0.7), ((96, 80), 0.2),
                                         ((300, 48), 0.5)])
def test_fast_path_equals_float64_svdvals_on_random_matrices(shape, ratio):
    """Condition numbers 115-413: auto picks float64 for these."""
    matrix = random_matrix(*shape, seed=shape[0] + shape[1])
    assert_fast_equals_svdvals(matrix, row_sets(shape[0], ratio, count=10, seed=1),
                               precisions=("auto", "float64"))


@pytest.mark.parametrize("shape,ratio", [((192, 64), 0.3), ((300, 48), 0.7), ((256, 96), 0.5)])
def test_float32_path_equals_float64_svdvals_on_well_conditioned_matrices(shape, ratio):
    matrix = conditioned_matrix(*shape, condition=20, seed=shape[0])
    assert LayerSpectrum(matrix).dtype == torch.float32
    assert_fast_equals_svdvals(matrix, row_sets(shape[0], ratio, count=10, seed=2))


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


def conditioned_matrix(rows: int, columns: int, condition: float, seed: int) -> torch.Tensor:
    """A float32 matrix whose singular values fall log-uniformly from 1 to ``1 / condition``."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    left, _, right = torch.linalg.svd(gaussian, full_matrices=False)
    values = torch.logspace(0, -math.log10(condition), columns, dtype=torch.float64)
    return ((left * values) @ right).float()


def test_auto_precision_uses_float32_only_for_well_conditioned_layers():
    assert LayerSpectrum(conditioned_matrix(300, 96, 20, seed=0)).dtype == torch.float32
    assert LayerSpectrum(conditioned_matrix(300, 96, 1e4, seed=0)).dtype == torch.float64
    assert LayerSpectrum(conditioned_matrix(300, 96, 20, 0), precision="float64").dtype == (
        torch.float64)
    assert LayerSpectrum(conditioned_matrix(300, 96, 1e4, 0), precision="float32").dtype == (
        torch.float32)
    # A rank-deficient first matrix (zero rows' worth of spectrum) is never "well conditioned".
    deficient = conditioned_matrix(300, 96, 20, seed=1)
    deficient[:, 0] = 0
    assert LayerSpectrum(deficient).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown spectral precision"):
        LayerSpectrum(deficient, precision="half")


def test_auto_precision_falls_back_where_float32_would_change_the_ks():
    """Why the bound exists: on a layer of condition 1000, the float32 Gram path changes the KS
    statistic of some slices; auto picks float64 there and matches float64 svdvals everywhere."""
    matrix = conditioned_matrix(1536, 576, 1000, seed=1000)
    rows = [row_set for ratio in (0.1, 0.3, 0.5) for row_set in
            row_sets(1536, ratio, count=6, seed=1000)]
    original = svdvals64(matrix)
    expected = [ks_statistic(original, svdvals64(matrix[kept])) for kept in rows]
    forced = LayerSpectrum(matrix, precision="float32")
    assert any(forced.ks(kept) != ks for kept, ks in zip(rows, expected))
    auto = LayerSpectrum(matrix)
    assert auto.dtype == torch.float64
    assert [auto.ks(kept) for kept in rows] == expected


@pytest.fixture(scope="module")
def smollm2_layers():
    """The first FFN matrix of every SmolLM2-135M layer, fp32."""
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
            for name in handle.keys():
                if name.endswith("mlp.gate_proj.weight"):
                    matrices[int(name.split(".")[2])] = handle.get_tensor(name).float()
    assert sorted(matrices) == list(range(30))
    return matrices


@pytest.fixture(scope="module")
def smollm2_first_matrices(smollm2_layers):
    return {layer: smollm2_layers[layer] for layer in (0, 29)}


@pytest.mark.real
@pytest.mark.parametrize("layer", [0, 29])
def test_fast_path_equals_float64_svdvals_on_smollm2(smollm2_first_matrices, layer):
    matrix = smollm2_first_matrices[layer]
    assert matrix.shape == (1536, 576)
    rows = row_sets(1536, 0.3, count=4, seed=layer) + row_sets(1536, 0.7, count=2, seed=layer)
    assert_fast_equals_svdvals(matrix, rows)


@pytest.mark.real
def test_float32_gram_keeps_the_ks_of_float64_svdvals_on_every_smollm2_layer(smollm2_layers):
    """The claim behind ``precision="auto"``: on all 30 real layers (condition 16-25) the float32
    Gram path, chosen by auto, gives exactly float64 svdvals' KS, for random and for norm-ranked
    kept rows (benchmarks/README.md: 840 slices of all layers at ratios 0.1-0.7 matched too)."""
    for layer, matrix in smollm2_layers.items():
        spectrum = LayerSpectrum(matrix, "gram")
        assert spectrum.dtype == torch.float32, layer
        original = svdvals64(matrix)
        by_norm = matrix.norm(dim=1).argsort(descending=True)
        for ratio in (0.2, 0.6):
            kept = kept_count(1536, ratio)
            rows = row_sets(1536, ratio, count=1, seed=layer) + [by_norm[:kept]]
            for kept_rows in rows:
                expected = ks_statistic(original, svdvals64(matrix[kept_rows]))
                assert spectrum.ks(kept_rows) == expected, (layer, ratio)


@pytest.mark.real
def test_reference_scores_smollm2_rows_like_prunenet(smollm2_first_matrices):
    matrix = smollm2_first_matrices[29]
    original = reference_impl.full_svd_values(matrix)
    spectrum = LayerSpectrum(matrix)
    for kept_rows in row_sets(1536, 0.3, count=3, seed=11):
        # Equal orderings; the two formulas may round the same fraction differently (1e-17).
        assert reference_impl.reference_ks(original, matrix[kept_rows]) == pytest.approx(
            spectrum.ks(kept_rows), abs=1e-12)
