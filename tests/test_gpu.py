"""The CUDA path (``--device cuda`` / ``auto`` with a GPU). Skipped where no GPU is present (CI):
run on a lent GPU machine with ``bash benchmarks/gpu_check.sh``.

A CUDA generator draws other numbers than a CPU one, so a GPU run samples other actions than a
CPU run with the same seed; what must hold is the spectral engine's exactness, determinism on the
GPU itself, and a pruned model identical to the CPU slice of the same kept rows.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import make_tiny_model
from prunenet.families import kept_count
from prunenet.pipeline import compress
from prunenet.selection.prunenet.reinforce import TrainingConfig, train_policy_on_matrices
from prunenet.selection.prunenet.spectral import LayerSpectrum, ks_statistic
from prunenet.slicing import slice_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def _matrix(rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator) * torch.logspace(-0.5, 0.5, columns)


@pytest.mark.parametrize("precision", ["auto", "float32", "float64"])
def test_cuda_spectra_keep_the_ks_of_cpu_float64_svdvals(precision):
    matrix = _matrix(768, 256, seed=1)
    original = torch.linalg.svdvals(matrix.double())
    generator = torch.Generator().manual_seed(2)
    kept = kept_count(768, 0.3)
    on_gpu = LayerSpectrum(matrix.cuda(), precision=precision)
    streamed = LayerSpectrum(matrix.cuda(), keep_matrix=False, precision=precision)
    for _ in range(10):
        rows = torch.randperm(768, generator=generator)[:kept].sort().values
        expected = ks_statistic(original, torch.linalg.svdvals(matrix[rows].double()))
        assert on_gpu.ks(rows.cuda()) == expected
        assert streamed.ks(rows.cuda(), matrix.cuda()) == expected


def test_cuda_training_is_deterministic_and_its_ks_are_exact():
    matrices = [_matrix(192, 64, seed=layer).cuda() for layer in range(3)]
    config = TrainingConfig(ratio=0.3, episodes=3, seed=5)
    first = train_policy_on_matrices(matrices, config, progress=False)
    second = train_policy_on_matrices(matrices, config, progress=False)
    assert [r.layer_ks for r in first.history] == [r.layer_ks for r in second.history]
    for name, tensor in first.policy.state_dict().items():
        assert tensor.device.type == "cuda"
        assert torch.equal(tensor, second.policy.state_dict()[name]), name
        assert torch.isfinite(tensor).all()


def test_cuda_compress_saves_the_cpu_slice_of_its_rows(tmp_path):
    model = make_tiny_model("llama")
    reference = make_tiny_model("llama")
    result = compress(model, 0.25, episodes=2, device="cuda", method="prunenet",
                      out=tmp_path / "gpu", progress=False)
    slice_model(reference, [rows.cpu() for rows in result.kept_rows])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpu").eval()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, reference(tokens).logits)
