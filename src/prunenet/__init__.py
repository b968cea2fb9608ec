"""prunenet: calibration-free structured FFN pruning of Hugging Face causal language models."""

from .errors import PruneNetError  # noqa: E402
from .evaluation.evaluate import evaluate  # noqa: E402
from .finetune import finetune  # noqa: E402
from .io.loading import load_model_and_tokenizer  # noqa: E402
from .io.policy_file import load_policy, save_policy  # noqa: E402
from .pipeline import compress, prune, select_rows, train_policy  # noqa: E402
from .version import __version__  # noqa: E402

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
