"""End to end on the real SmolLM2-135M (fetched by `prunenet fetch`): compress, reload with plain
transformers, perplexity against dense.

Documented factors (README "What to expect"): at r = 0.3 the default method stays within 5x of
dense perplexity (measured 2.7x on 4 windows); the faithful reference PruneNet after 2 episodes
is far worse (measured about 200x) and is only required to be finite and below 2000x.
"""

from __future__ import annotations

import math

import pytest
from transformers import AutoModelForCausalLM

import prunenet
from prunenet.assets import smollm2_path
from prunenet.evaluation.corpora import load_corpus
from prunenet.evaluation.perplexity import perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def dense_and_windows():
    model, tokenizer = prunenet.load_model_and_tokenizer(smollm2_path())
    windows = load_corpus("wiki", tokenizer).evaluation_windows(1024, 2)
    return model, windows, perplexity(model, windows, progress=False)


@pytest.mark.parametrize("method,factor", [("prunenet", 2000.0), (None, 5.0)])
def test_compress_smollm2_reload_and_perplexity(dense_and_windows, tmp_path, method, factor):
    _, windows, dense = dense_and_windows
    result = prunenet.compress(str(smollm2_path()), ratio=0.3, episodes=2, out=tmp_path / "out",
                               progress=False, method=method)
    assert result.record["method"] == (method or "self-generated")
    assert result.record["ffn_width_after"] == 1075
    assert result.record["parameters_after"] == 110_616_768
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    pruned = perplexity(reloaded, windows, progress=False)
    assert math.isfinite(pruned)
    assert dense < pruned < factor * dense
