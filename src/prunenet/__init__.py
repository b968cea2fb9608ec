"""prunenet: calibration-free structured FFN pruning of Hugging Face causal language models."""

from .errors import PruneNetError
from .evaluation.evaluate import evaluate
from .finetune import finetune
from .io.loading import load_model_and_tokenizer
from .io.policy_file import load_policy, save_policy
from .pipeline import compress, prune, select_rows, train_policy
from .version import __version__

__all__ = [
    "compress",
    "prune",
    "select_rows",
    "train_policy",
    "load_model_and_tokenizer",
    "load_policy",
    "save_policy",
    "PruneNetError",
    "evaluate",
    "finetune",
    "__version__",
]
