"""Shared fixtures: tiny random models of every supported family, built from configs."""

from __future__ import annotations

import os

# Set before transformers imports the Hugging Face Hub client, which reads them once: the tests
# never ask the Hub, however pytest is started.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from hypothesis import settings  # noqa: E402

# The suite is the gate every change passes: each property test draws the same examples on
# every run and every machine (a fresh clone has no example database), so a run fails where
# the code changed, not where a draw was unlucky. HYPOTHESIS_PROFILE=explore draws afresh.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

HIDDEN, FFN, LAYERS, HEADS, VOCAB = 32, 48, 2, 4, 128

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, max_position_embeddings=64)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(intermediate_size=FFN, num_key_value_heads=2,
                                              **_COMMON),
    "mistral": lambda: transformers.MistralConfig(intermediate_size=FFN, num_key_value_heads=2,
                                                  **_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(intermediate_size=FFN, num_key_value_heads=2,
                                              **_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(intermediate_size=FFN, num_key_value_heads=2,
                                              head_dim=8, **_COMMON),
    "gemma": lambda: transformers.GemmaConfig(intermediate_size=FFN, num_key_value_heads=2,
                                              head_dim=8, **_COMMON),
    "gemma2": lambda: transformers.Gemma2Config(intermediate_size=FFN, num_key_value_heads=2,
                                                head_dim=8, **_COMMON),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(intermediate_size=FFN,
                                                         num_key_value_heads=2, head_dim=8,
                                                         **_COMMON),
    "granite": lambda: transformers.GraniteConfig(intermediate_size=FFN, num_key_value_heads=2,
                                                  **_COMMON),
    "olmo": lambda: transformers.OlmoConfig(intermediate_size=FFN, **_COMMON),
    "olmo2": lambda: transformers.Olmo2Config(intermediate_size=FFN, **_COMMON),
    "phi": lambda: transformers.PhiConfig(intermediate_size=FFN, **_COMMON),
    "phi3": lambda: transformers.Phi3Config(intermediate_size=FFN, pad_token_id=0, **_COMMON),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          word_embed_proj_dim=HIDDEN, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN,
                                            n_layer=LAYERS, n_head=HEADS, n_positions=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(intermediate_size=FFN, **_COMMON),
    "falcon": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                                ffn_hidden_size=FFN, num_hidden_layers=LAYERS,
                                                num_attention_heads=HEADS, bias=True,
                                                new_decoder_architecture=False),
}


def _tiny_config(model_type: str, **fields) -> transformers.PretrainedConfig:
    config = TINY_CONFIGS[model_type]()
    if not fields:
        return config
    values = {**config.to_dict(), **fields}
    if "num_hidden_layers" in fields:
        if "layer_types" not in fields:
            values.pop("layer_types", None)  # derived again for the new depth
        values.pop(config.attribute_map.get("num_hidden_layers", "num_hidden_layers"), None)
        values["num_hidden_layers"] = fields["num_hidden_layers"]
    return type(config)(**values)


def make_tiny_model(model_type: str, seed: int = 0, **config) -> torch.nn.Module:
    """A randomly initialised tiny *ForCausalLM of ``model_type`` in eval mode (fp32); keywords
    replace fields of its config (``num_hidden_layers=5``)."""
    torch.manual_seed(seed)
    config = _tiny_config(model_type, **config)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Make every FFN weight and bias non-trivial (some families initialise biases to zero).
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model_type(request) -> str:
    return request.param


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return make_tiny_model("llama")


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_llama):
    """A tiny LLaMA saved as a local HF folder (safetensors) with no tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    return folder


def real_tokenizer_model(tmp_path_factory, name: str, max_shard_size: str = "5GB",
                         **config: int) -> Path:
    """A random LLaMA (seed 0) of ``config`` with SmolLM2's vocabulary (49152) and tied
    embeddings, saved in ``name`` with SmolLM2's real tokenizer; skips when SmolLM2 is not
    fetched."""
    from prunenet.assets import smollm2_path
    from prunenet.errors import MissingAssetError

    try:
        source = smollm2_path()
    except MissingAssetError as error:
        pytest.skip(str(error))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, tie_word_embeddings=True, **config)).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_real_tokenizer_dir(tmp_path_factory):
    """A tiny random LLaMA with SmolLM2's vocabulary (49152) saved with SmolLM2's real tokenizer,
    for evaluation tests that need text (perplexity on a corpus, lm-eval tasks)."""
    return real_tokenizer_model(tmp_path_factory, "tiny-real-tokenizer", hidden_size=32,
                                intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=2048)


def edit_config(folder: Path, **changes) -> None:
    """Update ``folder/config.json`` with ``changes``."""
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def assert_same_weights(expected_folder, actual_folder, atol: float = 1e-6) -> None:
    """Every tensor of ``expected_folder/model.safetensors`` equals ``actual_folder``'s."""
    from safetensors.torch import load_file

    expected = load_file(expected_folder / "model.safetensors")
    actual = load_file(actual_folder / "model.safetensors")
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=atol)
