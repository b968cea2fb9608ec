"""The refit stage: exact where the kept activations span the removed ones, never worse than
slicing on the probe, and a stock checkpoint of the same size."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import FFN, TINY_CONFIGS, VOCAB, make_tiny_model
from prunenet.errors import InputError, NumericalError
from prunenet.ffn_statistics import (
    SCORES,
    LayerStatistics,
    ProbeStatistics,
    add_activations,
    collect_ffn_statistics,
    layer_calls,
    layer_wanda_product,
)
from prunenet.model_view import FFNView, backbone
from prunenet.refit import reconstruction_error, refit_layer, refit_model, sequential_refit
from prunenet.selection.base import top_rows
from prunenet.slicing import slice_model

KEPT = torch.arange(0, FFN, 2)  # even neurons kept, odd ones removed


def _stats(activations: torch.Tensor) -> LayerStatistics:
    stats = LayerStatistics.empty(activations.shape[1])
    add_activations(stats, activations)
    return stats


def _probe(sequences: int = 6, length: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (sequences, length), generator=generator)


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@torch.no_grad()
def _duplicate_removed_neurons(model: torch.nn.Module) -> None:
    """Make every removed (odd) neuron a copy of the kept neuron before it (its activation, for
    every input, equals a kept one's), through the family's first-matrix cuts."""
    view = FFNView(model)
    for layer in view.layers:
        for cut in view.family.cuts[:-1]:
            try:
                tensor = layer.get_parameter(cut.name)
            except AttributeError:
                continue
            if tensor is None:
                continue
            moved = tensor.movedim(cut.axis, 0)
            moved[1::2] = moved[0::2]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("sequential", [False, True])
def test_ls_is_exact_when_removed_activations_are_combinations_of_kept(model_type, sequential):
    # Removed neuron 2j+1 duplicates kept neuron 2j: the refit can fold it into column 2j, so
    # the sliced model computes the original function (up to the ridge, 1e-9 of the Gram scale).
    model = make_tiny_model(model_type)
    _duplicate_removed_neurons(model)
    tokens, held_out = _probe(), _probe(seed=2)
    reference, held_out_reference = _logits(model, tokens), _logits(model, held_out)
    kept = [KEPT] * FFNView(model).num_layers
    plain = slice_model(copy.deepcopy(model), kept)
    if sequential:
        sequential_refit(model, kept, tokens, ridge=1e-9)
    else:
        refit_model(model, kept, collect_ffn_statistics(model, tokens), ridge=1e-9)
    slice_model(model, kept)
    assert (_logits(model, tokens) - reference).abs().max() < 1e-5
    assert (_logits(model, held_out) - held_out_reference).abs().max() < 1e-5
    assert (_logits(plain, tokens) - reference).abs().max() > 1e-3  # slicing alone is not exact


def test_sequential_selection_reads_the_pruned_stream():
    """``select`` sees each layer's statistics on the probe through the layers below, already
    pruned and refitted: layer 0's are the dense model's, later ones differ; the rows it returns
    give what the same rows given up front give."""
    model, tokens = make_tiny_model("llama"), _probe()
    dense = collect_ffn_statistics(model, tokens)
    chosen = copy.deepcopy(model)
    view = FFNView(chosen)  # the model being refitted, as the selection reads it
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def select(index: int, stats: LayerStatistics) -> torch.Tensor:
        rows = top_rows(layer_wanda_product(view, index, stats.mean_square), FFN // 2)
        seen.append((index, stats.gram.clone(), rows))
        return rows

    sequential_refit(chosen, None, tokens, target="pruned", select=select)
    assert [index for index, _, _ in seen] == list(range(view.num_layers))
    assert torch.allclose(seen[0][1], dense[0].gram, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(seen[-1][1], dense[-1].gram, rtol=1e-3)
    given = copy.deepcopy(model)
    sequential_refit(given, [rows for _, _, rows in seen], tokens, target="pruned")
    for a, b in zip(chosen.state_dict().values(), given.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for wrong in ({"target": "dense", "select": select}, {"target": "pruned"}):
        with pytest.raises(ValueError):
            sequential_refit(copy.deepcopy(model), None, tokens, **wrong)


def _ffn_io(model: torch.nn.Module, tokens: torch.Tensor) -> list[tuple]:
    """Per layer, every probe token's input and output of the second FFN matrix (float64)."""
    view, seen = FFNView(model), []
    handles = [view.second_matrix_module(index).register_forward_hook(
        lambda _m, args, out: seen.append((args[0].reshape(-1, args[0].shape[-1]).double(),
                                           out.reshape(-1, out.shape[-1]).double())))
        for index in range(view.num_layers)]
    _logits(model, tokens)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("mode", ["ls", "bias"])
def test_a_sequential_refit_to_the_dense_output_matches_it_and_records_its_error(mode):
    """target="dense": each layer's refit aims at the dense model's FFN output, on the pruned
    stream's activations. With ``bias`` the pruned FFN's mean output is the dense one's (it had
    been the original FFN's on the pruned stream, as with target="pruned"); the record's errors
    are those against the dense output, recomputed here token by token."""
    model, tokens = make_tiny_model("gpt2"), _probe()
    dense = _ffn_io(model, tokens)
    kept = [KEPT] * FFNView(model).num_layers
    record = sequential_refit(model, kept, tokens, mode, target="dense")
    assert record["statistics"] == "sequential-dense"
    pruned = _ffn_io(model, tokens)  # removed columns zeroed: the sliced model's outputs
    for layer, (_, wanted), (_, got) in zip(record["layers"], dense, pruned, strict=True):
        if mode == "bias":
            torch.testing.assert_close(got.mean(0), wanted.mean(0), rtol=0, atol=1e-5)
        energy = wanted.pow(2).sum()
        assert layer["relative_error_refit"] == pytest.approx(
            float((wanted - got).pow(2).sum() / energy), rel=1e-4)
    # Layer 1's pruned stream differs from the dense one: there the targets part.
    assert not torch.allclose(pruned[1][0], dense[1][0], atol=1e-4)


def test_ls_is_exact_for_linear_dependence_with_an_offset():
    generator = torch.Generator().manual_seed(0)
    kept_part = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    mixing = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    offset = torch.randn(4, generator=generator, dtype=torch.float64)
    activations = torch.cat([kept_part, kept_part @ mixing + offset], dim=1)
    second = torch.randn(5, 10, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    kept = torch.arange(6)
    stats = _stats(activations)
    columns, new_bias = refit_layer(second, bias, kept, stats, "ls", ridge=1e-12)
    original = activations @ second.T + bias
    refitted = kept_part @ columns.T + new_bias
    assert torch.allclose(refitted, original, atol=1e-8)


def test_bias_mode_is_exact_for_constant_removed_activations():
    # OPT's ReLU FFN: a removed neuron with a zero fc1 row outputs relu(its bias), a constant.
    model = make_tiny_model("opt")
    view = FFNView(model)
    with torch.no_grad():
        for layer in view.layers:
            layer.fc1.weight[1::2] = 0
            layer.fc1.bias[1::2] = layer.fc1.bias[1::2].abs() + 0.1
    tokens, held_out = _probe(), _probe(seed=3)
    reference, held_out_reference = _logits(model, tokens), _logits(model, held_out)
    kept = [KEPT] * view.num_layers
    record = refit_model(model, kept, collect_ffn_statistics(model, tokens), mode="bias")
    slice_model(model, kept)
    assert record["mode"] == "bias"
    assert (_logits(model, tokens) - reference).abs().max() < 1e-5
    assert (_logits(model, held_out) - held_out_reference).abs().max() < 1e-5


def test_bias_mode_needs_a_bias():
    model = make_tiny_model("llama")
    stats = collect_ffn_statistics(model, _probe())
    with pytest.raises(InputError, match="use refit 'ls'"):
        refit_model(model, [KEPT] * 2, stats, mode="bias")


@settings(max_examples=40, deadline=None)
# as many tokens as kept neurons and no ridge: an exact fit, whose error the statistics give
# only to their rounding
@example(seed=0, tokens=10, kept=10, ridge=0.0, with_bias=False, dead=0)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 40), kept=st.integers(1, 11),
       ridge=st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 100.0]), with_bias=st.booleans(),
       dead=st.integers(0, 3))
def test_refit_never_increases_the_probe_reconstruction_error(seed, tokens, kept, ridge,
                                                              with_bias, dead):
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(tokens, 12, generator=generator, dtype=torch.float64)
    activations[:, :dead] = 0  # dead neurons: a singular Gram, handled by the ridge
    second = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64) if with_bias else None
    kept_rows = torch.randperm(12, generator=generator)[:kept].sort().values
    stats = _stats(activations)
    try:
        columns, new_bias = refit_layer(second, bias, kept_rows, stats, "ls", ridge)
    except NumericalError:
        assert ridge == 0.0  # only an unregularised singular system may refuse
        return
    before = reconstruction_error(second, bias, kept_rows, second[:, kept_rows], bias, stats)
    after = reconstruction_error(second, bias, kept_rows, columns, new_bias, stats)
    # the error read from the statistics is a difference of sums of the size of the layer's
    # output energy: its rounding is relative to that, not to the (possibly zero) error
    rounding = 1e-9 * (1 + float((activations @ second.T).pow(2).sum()))
    assert after <= before * (1 + 1e-9) + rounding
    direct = activations @ second.T - activations[:, kept_rows] @ columns.T
    if bias is not None:
        direct += bias - new_bias
    assert after == pytest.approx(float(direct.pow(2).sum()), rel=1e-6, abs=rounding)


@pytest.mark.parametrize("ridge", [0.0])
def test_a_singular_refit_says_to_raise_the_ridge(ridge):
    """Dead neurons and a ridge of 0 (from Python) leave the system singular: the error names
    the ridge and says to raise it, as it would say to a positive ridge too small to help."""
    activations = torch.randn(64, 12, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float64)
    activations[:, :3] = 0
    second = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NumericalError, match=f"singular .* at ridge {ridge:g}; raise --ridge "
                                             r"\(the default is 0.3\)"):
        refit_layer(second, None, torch.arange(8), _stats(activations), "ls", ridge)


def test_non_finite_statistics_raise_naming_the_layer():
    model = make_tiny_model("llama")
    stats = collect_ffn_statistics(model, _probe())
    stats[1].gram[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NumericalError, match="layer 1"):
        refit_model(model, [KEPT] * 2, stats)
    after = model.state_dict()  # layer 0's refit was fine, and is not written either
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "falcon"])
def test_refit_keeps_the_architecture_and_reloads_exactly(model_type, tmp_path):
    model = make_tiny_model(model_type)
    tokens = _probe()
    stats = collect_ffn_statistics(model, tokens)
    kept = [rows for rows in
            (torch.topk(score, FFN // 2).indices.sort().values
             for score in SCORES["wanda"](model, stats))]
    plain = slice_model(copy.deepcopy(model), kept)
    record = refit_model(model, kept, stats)
    slice_model(model, kept)
    assert [layer["relative_error_refit"] <= layer["relative_error_sliced"] + 1e-12
            for layer in record["layers"]] == [True] * len(record["layers"])
    assert FFNView(model).parameter_counts() == FFNView(plain).parameter_counts()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(_logits(reloaded, tokens), _logits(model, tokens))


def test_scores_read_the_statistics():
    model = make_tiny_model("gpt2")
    stats = collect_ffn_statistics(model, _probe())
    for name, score in SCORES.items():
        values = score(model, stats)
        assert len(values) == 2 and values[0].shape == (FFN,), name
        assert torch.isfinite(values[0]).all() and (values[0] >= 0).all(), name


def _budget_of(layers: int) -> int:
    return layers * FFN * FFN * 8  # bytes of that many float64 Grams


def _deep_model(model_type: str, layers: int = 5) -> torch.nn.Module:
    """A tiny model of ``layers`` layers; where the family has sliding-window attention, a window
    of 8 (shorter than the probe) on alternate layers, so that layers receive different masks."""
    fields = {"num_hidden_layers": layers}
    config = TINY_CONFIGS[model_type]()
    if hasattr(config, "sliding_window"):
        fields["sliding_window"] = 8
    if getattr(config, "layer_types", None) is not None and model_type.startswith("gemma"):
        fields["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + [
            "sliding_attention"] * (layers % 2)
    return make_tiny_model(model_type, **fields)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_statistics_held_a_few_layers_at_a_time_equal_one_pass(model_type):
    """Grams collected two layers at a time, the later groups' layers run again from the
    hidden states entering them, are the single pass's, bit for bit; no layer runs twice
    after the first pass."""
    model = _deep_model(model_type)
    tokens = _probe(sequences=7)
    whole = collect_ffn_statistics(model, tokens, batch_size=3)
    calls = {index: 0 for index in range(5)}
    for index in calls:
        FFNView(model).second_matrix_module(index).register_forward_pre_hook(
            lambda _m, _a, index=index: calls.__setitem__(index, calls[index] + 1))
    statistics = ProbeStatistics(model, tokens, budget=_budget_of(2), batch_size=3)
    assert [list(group) for group in statistics.groups] == [[0, 1], [2, 3], [4]]
    every = statistics.every_layer()
    assert [stats.gram for stats in every] == [None] * 5
    assert calls == {index: 3 for index in range(5)}  # one pass of three batches
    grouped = list(statistics.with_grams())
    assert calls == {0: 3, 1: 3, 2: 6, 3: 6, 4: 6}
    for one, few, cheap in zip(whole, grouped, every, strict=True):
        assert torch.equal(one.gram, few.gram)
        assert torch.equal(one.total, cheap.total) and torch.equal(one.squares, cheap.squares)
        assert one.count == cheap.count == few.count == 7 * 24
        # the same squares, summed in float64 here and in the Gram's float32 products there
        assert torch.allclose(one.squares, one.gram.diagonal(), rtol=1e-5, atol=0)


def test_kept_statistics_serve_every_refit_alike_and_only_where_every_gram_fits():
    """Statistics kept for a compare's runs yield the same Grams and sums on every pass over
    them (each the single pass's, bit for bit), run the model once, and say which probe they
    are on; where the Grams do not fit the budget at once none are kept."""
    model = _deep_model("llama")
    tokens = _probe(sequences=7)
    assert ProbeStatistics.kept(model, tokens, budget=_budget_of(4)) is None
    whole = collect_ffn_statistics(model, tokens, batch_size=3)
    statistics = ProbeStatistics.kept(model, tokens, budget=_budget_of(5), batch_size=3)
    runs = []
    FFNView(model).second_matrix_module(0).register_forward_pre_hook(
        lambda *_: runs.append(1))
    for _ in range(3):
        for one, kept in zip(whole, statistics.with_grams(), strict=True):
            assert torch.equal(one.gram, kept.gram) and torch.equal(one.total, kept.total)
    assert len(runs) == 3  # one pass of three batches, for every refit
    assert statistics.reads(tokens.clone()) and not statistics.reads(tokens[:6])
    other = tokens.clone()
    other[0, 1] += 1
    assert not statistics.reads(other)


def test_statistics_hold_at_most_one_group_of_grams():
    model = _deep_model("llama")
    created = []
    empty = LayerStatistics.empty

    def tracked(d_ff, gram=True):
        stats = empty(d_ff, gram)
        if stats.gram is not None:
            created.append(weakref.ref(stats.gram))
        return stats

    alive = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LayerStatistics, "empty", staticmethod(tracked))
        statistics = ProbeStatistics(model, _probe(), budget=_budget_of(2))
        for stats in statistics.with_grams():
            alive.append(sum(ref() is not None for ref in created))
            del stats
    assert len(created) == 5 and alive == [2, 1, 2, 1, 1]


def test_the_refit_lets_each_gram_go_before_the_next_is_collected():
    """Grams collected one layer per pass and refitted as they come: when a layer's Gram is
    created, no earlier layer's is alive (the memory of an offloaded run holds one)."""
    model = _deep_model("llama")
    created, alive_when_created = [], []
    empty = LayerStatistics.empty

    def tracked(d_ff, gram=True):
        if gram:
            alive_when_created.append(sum(ref() is not None for ref in created))
        stats = empty(d_ff, gram)
        if stats.gram is not None:
            created.append(weakref.ref(stats.gram))
        return stats

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LayerStatistics, "empty", staticmethod(tracked))
        statistics = ProbeStatistics(model, _probe(), budget=_budget_of(1))
        record = refit_model(model, [torch.arange(FFN // 2)] * 5, statistics.with_grams())
    assert len(record["layers"]) == len(created) == 5
    assert alive_when_created == [0] * 5


def test_the_refit_refuses_statistics_for_another_number_of_layers():
    model = _deep_model("llama", layers=3)
    stats = collect_ffn_statistics(model, _probe())
    state = {name: value.clone() for name, value in model.state_dict().items()}
    rows = [torch.arange(FFN // 2)] * 3
    for statistics in (stats[:2], [*stats, stats[0]]):
        with pytest.raises(ValueError, match="statistics for"):
            refit_model(model, rows, statistics)
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


def test_a_model_refitted_from_grams_held_layer_by_layer_is_the_same(monkeypatch):
    import prunenet
    from prunenet import ffn_statistics

    results = []
    for budget in (ffn_statistics.GRAM_BUDGET, 1):  # all layers at once; one layer per pass
        monkeypatch.setattr(ffn_statistics, "GRAM_BUDGET", budget)
        model = _deep_model("gemma3_text", layers=4)
        results.append(prunenet.compress(model, 0.3, probe_tokens=256, progress=False))
    one, layered = results
    assert [r.tolist() for r in one.kept_rows] == [r.tolist() for r in layered.kept_rows]
    assert one.record["reconstruct"] == layered.record["reconstruct"]
    one_state, layered_state = one.model.state_dict(), layered.model.state_dict()
    assert all(torch.equal(one_state[name], layered_state[name]) for name in one_state)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_layers_run_again_one_at_a_time_compute_what_the_model_computes(model_type):
    """What each layer received in a pass (its own mask and position embeddings: sliding-window
    layers beside global ones) lets the layers run again one at a time, as the sequential refit
    does, with the hidden states of the whole model's forward, bit for bit."""
    model = _deep_model(model_type)
    tokens = _probe(sequences=4)
    entering, calls = layer_calls(model, tokens, batch_size=3)
    assert [len(layer) for layer in calls] == [2] * 5
    for batch, start in enumerate(range(0, 4, 3)):
        with torch.no_grad():
            expected = backbone(model)(tokens[start:start + 3], use_cache=False,
                                       output_hidden_states=True).hidden_states
        hidden = entering[batch]
        assert torch.equal(hidden, expected[0])
        for index, layer in enumerate(FFNView(model).layers[:-1]):
            hidden = calls[index][batch].run(layer, hidden)
            assert torch.equal(hidden, expected[index + 1]), index
