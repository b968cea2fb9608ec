"""Where the default's gap to the calibration-based baseline comes from: the text or the score.

For each text (the default's self-generated probe for the given seeds; 4 x 1024 real training
tokens of the wiki corpus) and each per-neuron score (output energy ``mean h^2 * ||down||^2``,
the default's; Wanda-like ``mean h^2 * ||gate row||^2``, the `activation` baseline's; their
product), prints the perplexity on the first 16 evaluation windows at r = 0.1 / 0.2 / 0.3.

    python benchmarks/score_vs_text.py 0        # seeds of the self-generated text
"""
import copy
import sys

import torch
from ablation_scores import (  # benchmarks/ablation_scores.py
    down_column_norms,
    earlier_default_probe,
)

from prunenet.evaluation.corpora import load_corpus
from prunenet.evaluation.perplexity import perplexity
from prunenet.families import kept_count
from prunenet.io.loading import load_model_and_tokenizer
from prunenet.model_view import FFNView
from prunenet.selection.activation import Calibration, activation_norms, calibration_windows
from prunenet.selection.base import top_rows
from prunenet.selection.self_generated import mean_squared_activations
from prunenet.slicing import slice_model


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype=torch.float32)
    model.eval()
    corpus = load_corpus("wiki", tokenizer)
    windows = corpus.evaluation_windows(1024, 16)
    view = FFNView(model)
    down2 = [down_column_norms(view, i).pow(2) for i in range(view.num_layers)]
    gate2 = [view.first_matrix(i, "cpu").norm(dim=1).pow(2) for i in range(view.num_layers)]
    texts = {}  # text name -> per layer, each neuron's mean squared activation
    for seed in map(int, sys.argv[1].split(",")):
        tokens = earlier_default_probe(model, seed)
        texts[f"self-generated seed {seed}"] = mean_squared_activations(model, tokens)
    real = activation_norms(model, calibration_windows(corpus, Calibration(windows=4)),
                            progress=False)
    texts["real 4 x 1024"] = [norms.pow(2) for norms in real]
    scores = {
        "energy h^2 ||down||^2": lambda h2, i: h2 * down2[i],
        "wanda h^2 ||gate||^2": lambda h2, i: h2 * gate2[i],
        "product": lambda h2, i: h2 * down2[i] * gate2[i],
    }
    for text, h2 in texts.items():
        for name, score in scores.items():
            values = []
            for ratio in (0.1, 0.2, 0.3):
                pruned = copy.deepcopy(model)
                kept = kept_count(view.d_ff, ratio)
                slice_model(pruned, [top_rows(score(h2[i], i), kept)
                                     for i in range(view.num_layers)])
                values.append(round(perplexity(pruned, windows, progress=False), 2))
            print(f"{text} | {name} | {values}", flush=True)


if __name__ == "__main__":
    from script_main import run_script

    run_script(main)
