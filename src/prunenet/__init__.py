"""prunenet: calibration-free structured FFN pruning of causal LMs with PruneNet (ICLR 2025)."""

__version__ = "0.1.0"

from .api import compress, prune, select_rows, train_policy  # noqa: E402
from .checkpoints import load_model_and_tokenizer, load_policy, save_policy  # noqa: E402
from .errors import PruneNetError  # noqa: E402
from .evaluation.evaluate import evaluate  # noqa: E402
from .finetune import finetune  # noqa: E402

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
