"""Functions the shipped task YAMLs name with ``!function``.

lm-eval imports this file by path, so imports here are absolute. Data comes from the prunenet
cache (``prunenet fetch``); the document processing is lm-eval's own, so scores match its tasks.
"""

from __future__ import annotations

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import (
    doc_to_choice as winogrande_doc_to_choice,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (
    doc_to_target as winogrande_doc_to_target,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (
    doc_to_text as winogrande_doc_to_text,
)

from prunenet.evaluation.zeroshot import load_split

__all__ = [
    "hellaswag_process_docs",
    "load_split",
    "winogrande_doc_to_choice",
    "winogrande_doc_to_target",
    "winogrande_doc_to_text",
]
