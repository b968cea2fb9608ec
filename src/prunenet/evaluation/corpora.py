"""Text corpora as token streams, split once into evaluation and training regions.

One rule for the whole project: the first ``evaluation_tokens`` tokens of a corpus (128 windows of
1024 tokens, or the first half of a small corpus) are for evaluation only; training (LoRA recovery)
and calibration (the ``activation`` baseline) draw windows from the rest. So evaluation windows are
never trained or calibrated on, whichever command used the corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..assets import asset_path, cache_dir
from ..errors import InputError

EVALUATION_TOKENS = 128 * 1024
NAMED_CORPORA = {"wiki": "the Wikipedia sample (2,349 articles) shipped in exllamav3==1.6.5"}


def _wiki_text() -> str:
    lines = (asset_path("wiki") / "wiki.utf8").read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith(("<doc", "</doc>")))


def recorded_corpus(source: str) -> str:
    """A corpus argument as records and the card's commands name it: a file or datasets
    folder by its absolute path (which text, from any folder, as they name the source); a
    named corpus, and a path that does not exist, as given."""
    if source in NAMED_CORPORA or not str(source).strip():
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def corpus_read_path(source: str | None) -> str | None:
    """The path a corpus argument reads, for the output guard: a named corpus's folder in the
    cache (None before it is fetched), else the argument itself (a file or folder)."""
    if source in NAMED_CORPORA:
        folder = cache_dir() / "wiki"
        return str(folder) if folder.exists() else None
    if source is not None:
        refuse_empty_corpus(source)  # as a path it would be the current folder
    return source


def refuse_empty_corpus(source: str) -> None:
    """Refuse an empty (or blank) corpus argument, naming what a corpus may be."""
    if not source.strip():
        raise InputError(f"the corpus is empty; give a named corpus ({', '.join(NAMED_CORPORA)}), "
                         "a .txt or .jsonl file or a datasets folder")


DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json")  # what save_to_disk writes


def check_corpus(source: str) -> None:
    """Refuse, before any work, a corpus argument that names nothing readable: not a named
    corpus and no such file or folder, or a folder that is not a datasets folder."""
    if source in NAMED_CORPORA:
        return
    refuse_empty_corpus(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(
            f"unknown corpus {source!r}: not a named corpus ({', '.join(NAMED_CORPORA)}) "
            "and no such file or folder"
        )
    if not path.is_dir() and not path.is_file():
        raise InputError(f"{path} is not a regular file (a device, pipe or socket: a corpus is "
                         "read more than once, and a device may never end); give a named corpus, "
                         "a .txt or .jsonl file or a datasets folder")
    if path.is_dir() and not any((path / name).is_file() for name in DATASET_MARKERS):
        raise InputError(f"{path} is not a datasets folder (save_to_disk writes "
                         f"{' or '.join(DATASET_MARKERS)}); give a folder, .txt or .jsonl file")


def read_corpus_text(source: str) -> str:
    """Raw text of a named corpus, a .txt file, a .jsonl file ("text" field) or a dataset folder."""
    if source in NAMED_CORPORA:
        return _wiki_text()
    check_corpus(source)
    path = Path(source).expanduser()
    if path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise InputError(f"{path} is not a datasets folder (save_to_disk): {error}") from error
        if hasattr(dataset, "keys"):  # a DatasetDict: take its first split
            dataset = dataset[sorted(dataset.keys())[0]]
        if "text" not in dataset.column_names:
            raise InputError(f"{path} has no 'text' column (columns: {dataset.column_names})")
        texts = dataset["text"]
        if not all(isinstance(text, str) for text in texts):
            raise InputError(f"{path}: every 'text' must be a string (some are not)")
        return "\n\n".join(texts)
    if path.suffix.lower() == ".jsonl":  # data.JSONL too: never its JSON syntax as text
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise InputError(f"{path}:{number}: expected a JSON object with 'text'") from error
            if not isinstance(text, str):
                raise InputError(f"{path}:{number}: 'text' must be a string, got "
                                 f"{type(text).__name__}")
            texts.append(text)
        return "\n\n".join(texts)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text") from error


def expects_bos(tokenizer) -> bool:
    """True when the tokenizer prepends BOS (Gemma, Llama 2/3); windows then start with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


@dataclass
class TokenCorpus:
    """A corpus as one token stream with its fixed evaluation/training split."""

    name: str
    tokens: Tensor  # 1-D int64, no special tokens
    bos_token_id: int | None  # prepended to each window when the model expects it

    @property
    def evaluation_tokens(self) -> int:
        return min(EVALUATION_TOKENS, self.tokens.numel() // 2)

    def _windows(self, region: Tensor, seqlen: int) -> Tensor:
        body = seqlen - 1 if self.bos_token_id is not None else seqlen
        count = region.numel() // body
        windows = region[: count * body].view(count, body)
        if self.bos_token_id is not None:
            bos = torch.full((count, 1), self.bos_token_id, dtype=windows.dtype)
            windows = torch.cat([bos, windows], dim=1)
        return windows

    def evaluation_windows(self, seqlen: int = 1024, count: int | None = None,
                           advice: str = "") -> Tensor:
        """The first ``count`` non-overlapping windows (count x seqlen) of the evaluation region.
        More than it holds are refused, ``advice`` (formatted with ``held``, the count it
        holds) said after the counts."""
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 1):
            raise InputError(f"windows must be a positive number of windows, got {count!r}")
        windows = self._windows(self.tokens[: self.evaluation_tokens], seqlen)
        if windows.shape[0] == 0:  # said first: fewer windows would not help
            raise InputError(
                f"corpus {self.name!r} is too short for one window of {seqlen} tokens: its "
                f"evaluation region (the first half of a small corpus) holds "
                f"{self.evaluation_tokens} tokens; give a longer text or shorter windows"
            )
        if count is not None:
            if count > windows.shape[0]:
                raise InputError(
                    f"corpus {self.name!r} holds {windows.shape[0]} evaluation windows of "
                    f"{seqlen} tokens; asked for {count}"
                    + (f"; {advice.format(held=windows.shape[0])}" if advice else ""))
            windows = windows[:count]
        return windows

    def training_windows(self, seqlen: int = 1024) -> Tensor:
        """All non-overlapping windows of the training region (never overlaps evaluation)."""
        windows = self._windows(self.tokens[self.evaluation_tokens:], seqlen)
        if windows.shape[0] == 0:
            raise InputError(
                f"corpus {self.name!r} has {self.tokens.numel() - self.evaluation_tokens} training "
                f"tokens, fewer than one window of {seqlen}"
            )
        return windows


def load_corpus(source: str, tokenizer) -> TokenCorpus:
    """Tokenize ``source`` (see :func:`read_corpus_text`) with ``tokenizer``, no special tokens."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer; save one next to the model to read text "
                         "with it")
    text = read_corpus_text(source)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False).input_ids
    tokens = torch.tensor(ids, dtype=torch.long)
    bos = tokenizer.bos_token_id if expects_bos(tokenizer) else None
    return TokenCorpus(name=source, tokens=tokens, bos_token_id=bos)
