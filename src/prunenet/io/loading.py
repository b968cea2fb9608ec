"""Loading models (HF folder, GGUF, Hub id), saving stock checkpoints and policies, atomically.

Outputs are written into a hidden temporary sibling and renamed into place once complete; the
compression record ``prunenet.json`` is written last, so a folder without it is not a finished
output. Weights are read only through safetensors (or transformers' own safe loaders); remote code
runs only when the caller asks for it.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import logging
import math
import os
import shutil
import socket
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from ..assets import (
    CONVERTED_MARKER,
    MODELS,
    asset_path,
    cache_dir,
    conversion_marker,
    converted_from_pinned,
    model_path,
)
from ..errors import InputError, OutputError, first_line
from ..families import family_for
from .files import (
    Output,
    Recognizer,
    absent_or_empty,
    any_tree,
    atomic_folder,
    folder_of,
    guard_outputs,
    is_staging_name,
    json_with_format,
    write_json_atomic,
    write_text_atomic,
)
from .model_card import CARD_NAME, card_fields, card_value, conversion_card, render_card

RECORD_NAME = "prunenet.json"
MODEL_ALIASES = {alias: model.description for alias, model in MODELS.items()}


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.lower().endswith(".gguf") or (
        os.sep in source and source.count("/") != 1)


def resolve_source(source: str | os.PathLike, staged: bool = False) -> tuple[str, str | None]:
    """Return ``(folder_or_hub_id, gguf_file_name_or_None)`` for a user's MODEL argument; an
    unfinished output's folder is refused unless ``staged`` (a run reading its own)."""
    text = str(source)
    if text in MODEL_ALIASES:
        return str(model_path(text)), None
    if not text.strip():
        raise InputError("the model path is empty; give a model folder, a .gguf file or one of "
                         f"{', '.join(MODEL_ALIASES)}")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(path.parent), path.name
        raise InputError(f"{path} is a file but not a .gguf; pass a model folder or a GGUF file")
    if path.is_dir():
        if is_staging_name(path.name) and not staged:
            raise InputError(f"{path} is an unfinished prunenet output (interrupted); delete it")
        _refuse_broken_links(path)
        if (path / "config.json").exists():
            return str(path), None
        ggufs = sorted(entry for entry in path.glob("*.gguf") if entry.is_file())
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        if ggufs:
            names = ", ".join(entry.name for entry in ggufs)
            raise InputError(f"{path} holds {len(ggufs)} .gguf files ({names}) and no "
                             "config.json; name the .gguf file to read")
        raise InputError(f"{path} is not a model folder: it has no config.json (nor one .gguf "
                         "file)")
    if path.exists():
        raise InputError(f"{path} is neither a model folder nor a .gguf file")
    if _looks_like_path(text) or text.count("/") > 1:
        raise InputError(f"model path {text} does not exist{_did_you_mean(text)}")
    _check_hub_id(text)
    return text, None  # a Hub id


def _refuse_broken_links(folder: Path) -> None:
    """Refuse a model folder holding a symbolic link, among the files a load reads, whose
    target is missing: a Hugging Face cache snapshot (every file a link into ``../../blobs``)
    copied elsewhere, or whose blobs were deleted (the file would pass for absent)."""
    for entry in sorted(folder.iterdir()):
        read = entry.suffix.lower() in (".json", ".safetensors", ".gguf") \
            or entry.name in TOKENIZER_FILES
        if read and entry.is_symlink() and not entry.exists():
            raise InputError(
                f"{entry} is a symbolic link to {os.readlink(entry)}, which does not exist (a "
                "Hugging Face cache snapshot copied without the files its links point at?); "
                "copy the files themselves (cp -rL) or give the folder the links work in")


def _did_you_mean(text: str) -> str:
    """``; did you mean X?`` for the alias or neighbouring file name nearest a missing path."""
    path = Path(text).expanduser()
    try:
        names = [entry.name for entry in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        names = []
    close = difflib.get_close_matches(path.name, [*names, *MODEL_ALIASES], n=1, cutoff=0.6)
    if not close:
        return ""
    suggestion = close[0] if close[0] in MODEL_ALIASES and close[0] not in names else str(
        Path(text).parent / close[0])
    return f"; did you mean {suggestion}?"


def _check_hub_id(text: str) -> None:
    """Refuse at once a name that is neither a local path nor loadable from the Hugging Face
    Hub: not a valid repository id, or not in the Hub cache while the Hub cannot be reached
    (the Hub client would retry for half a minute before failing)."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        cached = huggingface_hub.try_to_load_from_cache(text, "config.json")
    except HFValidationError:
        raise InputError(f"model path {text} does not exist{_did_you_mean(text)}") from None
    host = _unreachable_hub()
    if host is not None and not isinstance(cached, str):
        raise InputError(
            f"model {text!r} is neither a local path nor one of prunenet's models "
            f"({', '.join(MODEL_ALIASES)}), and as a Hugging Face Hub id it cannot be fetched: "
            f"{host} cannot be reached (offline?){_did_you_mean(text)}")


def hub_cache_folder(hub_id: str) -> Path | None:
    """The Hugging Face cache's folder of the Hub id's repository (its snapshots, the blobs
    their files link to, its refs), where the cache holds one; None otherwise."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=hub_id, repo_type="model")
    return folder if folder.is_dir() else None


HUB_CONNECT_TIMEOUT = 3.0  # seconds; the Hub client retries for about 30 s where this fails


def _unreachable_hub() -> str | None:
    """The Hub's host name where the Hub cannot be reached from here: its name does not
    resolve, or a connection to it is refused or times out, and no proxy is set that might
    reach it (in offline mode the Hub client fails at once by itself); None where it may be
    reached."""
    from huggingface_hub import constants

    proxies = urllib.request.getproxies()
    if constants.HF_HUB_OFFLINE or proxies.get("https") or proxies.get("all"):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or constants.ENDPOINT
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    return None if _connects(host, port) else host


@functools.cache
def _connects(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` opens within :data:`HUB_CONNECT_TIMEOUT`;
    asked once per process (a command loads a config, a model and a tokenizer)."""
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError:
        return False
    return True


def _hub_options(folder: str, model: bool = False) -> dict[str, Any]:
    """``from_pretrained`` keywords for ``folder``: for a Hub id while the Hub cannot be
    reached, its cached files only (the client would otherwise retry for minutes first);
    ``model``: for a model class, whose adapter lookup takes them separately."""
    if Path(folder).exists() or _unreachable_hub() is None:
        return {}
    cached = {"local_files_only": True}
    return {**cached, "adapter_kwargs": cached} if model else cached


def recorded_source(source: str | os.PathLike) -> str:
    """How a record names a MODEL argument so that a later command finds the same model from
    any folder: an alias or a Hub id as given, a local path made absolute."""
    text = str(source)
    if text in MODEL_ALIASES:
        return text
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def _hub_error(source: str, error: Exception) -> InputError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return InputError(
        f"could not load {source!r}: it is not a local path, and fetching it as a Hugging Face Hub "
        f"id failed ({'offline mode' if offline else type(error).__name__}: "
        f"{first_line(error)}). Pass a local model folder or GGUF "
        f"file, or connect to the Hub{_did_you_mean(source) or '.'}"
    )


def validate_safetensors(path: Path) -> dict[str, Any]:
    """Let safetensors judge a weights file (header, offsets, dtypes); return its raw header.

    Every dtype safetensors supports is accepted. Raises :class:`InputError` naming the file for
    anything safetensors rejects (truncated file, lying or overlapping offsets, a header that
    does not parse) and for a folder named like a weights file. The raw header (for the byte
    offsets streaming needs) is read only after safetensors accepted the file.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(f"{path} is not a file; a .safetensors weights file was expected")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(f"{path} is not a valid safetensors file ({first_line(error)}); the "
                         "file is truncated, damaged or its header lies") from error
    return _raw_header(path)


def _raw_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header as stored: each tensor's dtype, shape and byte offsets."""
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(header_length))


def gguf_reader(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` of ``path`` (read-only, memory-mapped), made once per unchanged file.

    Parsing the header builds an array per vocabulary entry and takes seconds (SmolLM2's 49,152
    tokens about 2.5 s, Qwen2.5's 151,936 tokens and merges about 7 s); a compression that writes
    GGUF reads it to check the input, its FFN width, the output's formats and block multiple. The
    last file's reader is kept, keyed by its resolved path, size and modification time, so an
    edited or replaced file is read again; :func:`load_model_and_tokenizer` releases it before
    the weights load (the parsed header holds 160-360 MiB), and the writer parses it once more.
    """
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    return _gguf_reader(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _gguf_reader(path: str, size: int, mtime_ns: int):
    import gguf

    return gguf.GGUFReader(path)


def gguf_parameters(path: str | os.PathLike) -> int:
    """How many parameters the GGUF at ``path`` holds, counted from its header."""
    return sum(int(tensor.n_elements) for tensor in gguf_reader(path).tensors)


def gguf_header_bytes(path: str | os.PathLike) -> int:
    """The size of the GGUF's header: its metadata (the tokenizer's vocabulary and merges among
    it) and tensor table, everything before the tensor data."""
    return int(gguf_reader(path).data_offset)


def validate_gguf(path: Path) -> None:
    """Parse a GGUF file's header and tensor table; a damaged file, or a tensor stored in a
    type that cannot be dequantized (every load and conversion dequantizes every tensor), is an
    :class:`InputError`."""
    try:
        reader = gguf_reader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} extends past the end of the file")
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError) as error:
        raise InputError(f"{path} is not a valid GGUF file ({error})") from error
    first_of_type: dict[Any, str] = {}
    for tensor in reader.tensors:
        first_of_type.setdefault(tensor.tensor_type, tensor.name)
    for tensor_type, name in first_of_type.items():
        if not _dequantizable(tensor_type):
            raise InputError(f"{path}: tensor {name} is stored as {tensor_type.name}, which "
                             "the gguf library cannot dequantize; requantize the model to a "
                             "type it reads (F16, BF16, Q8_0, Q4_K, ...)")


@functools.cache
def _dequantizable(tensor_type: Any) -> bool:
    """Whether gguf's ``dequantize`` reads GGUF tensors of ``tensor_type`` (tried on one block
    of zeros: the library names no list of what it reads)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, dequantize

    _, type_size = GGML_QUANT_SIZES[tensor_type]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), tensor_type)
    except NotImplementedError:
        return False
    return True


def validate_weight_files(folder: Path) -> None:
    """Check every safetensors file of a local model folder, and its shard index if any.

    Shard names in ``model.safetensors.index.json`` must be plain file names inside ``folder``.
    """
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"{index_file} is not a valid shard index ({error})") from error
        if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) and isinstance(shard, str)
                for name, shard in weight_map.items()):
            raise InputError(f"{index_file}: 'weight_map' must map tensor names to shard file "
                             f"names, got {type(weight_map).__name__}")
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise InputError(f"{index_file} names shard {shard!r} outside the model folder")
            if not (folder / shard).is_file():
                raise InputError(f"{index_file} names shard {shard}, which is missing")
    for file in sorted(folder.glob("*.safetensors")):
        validate_safetensors(file)


# safetensors' float types, by the names its headers give them
FLOAT_TYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
               "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
               "F8_E5M2": torch.float8_e5m2}


def prevailing_float_type(tensors: Iterable[tuple[str, int]]) -> torch.dtype | None:
    """The float type most values are stored in, of ``tensors`` (safetensors type name, count
    of values each); None where none is a float."""
    counts: dict[str, int] = {}
    for dtype, numel in tensors:
        if dtype in FLOAT_TYPES:
            counts[dtype] = counts.get(dtype, 0) + numel
    return FLOAT_TYPES[max(counts, key=counts.__getitem__)] if counts else None


def stored_float_type(folder: Path) -> torch.dtype | None:
    """The float type most of a local checkpoint's weights are stored in, from the headers of
    the files transformers loads (model.safetensors, else the shards its index names; checked
    by :func:`validate_weight_files`): its config's dtype may say otherwise."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [folder / shard for shard in
                 sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        return None
    return prevailing_float_type((entry["dtype"], math.prod(entry["shape"]))
                                 for file in files for name, entry in _raw_header(file).items()
                                 if name != "__metadata__")


def load_config(source: str | os.PathLike, trust_remote_code: bool = False,
                staged: bool = False):
    """The transformers config of ``source``, with its family checked before any weight loads
    (``staged``: as :func:`resolve_source`)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    folder, gguf_file = resolve_source(source, staged)
    if gguf_file is not None:
        validate_gguf(Path(folder) / gguf_file)
    elif Path(folder).is_dir():
        read_config_json(Path(folder))
    try:
        if gguf_file is not None:  # transformers parses the whole header for it: once a file
            stat = (Path(folder) / gguf_file).stat()
            config = copy.deepcopy(_gguf_config(folder, gguf_file, stat.st_size,
                                                stat.st_mtime_ns))
        else:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                **_hub_options(folder))
    except (OSError, ValueError, TypeError, KeyError, AttributeError,
            StrictDataclassError) as error:  # the last: a field of the wrong type
        if Path(folder).exists():
            raise InputError(f"{source} is not a readable model: {first_line(error)}") from error
        raise _hub_error(folder, error) from error
    if gguf_file is None and not Path(folder).is_dir():  # a Hub id: its config.json
        _refuse_quantized(source, config.to_dict())
    family = family_for(getattr(config, "model_type", None))
    field = _non_finite_field(config.to_dict())
    if field is not None:
        raise InputError(f"{source}: config field {field} is not a finite number; a model "
                         "computes nothing finite with it. The config is damaged")
    for field in family.width_fields:
        value = getattr(config, field, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise InputError(f"{source}: config field {field} must be a positive integer, got "
                             f"{value!r}")
    return config


def _non_finite_field(values: Any, name: str = "") -> str | None:
    """The dotted name of the first NaN or infinite number in a config's values, else None."""
    if isinstance(values, float) and not math.isfinite(values):
        return name
    items = values.items() if isinstance(values, dict) else enumerate(values) if isinstance(
        values, list) else ()
    for key, value in items:
        found = _non_finite_field(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=1)
def _gguf_config(folder: str, gguf_file: str, size: int, mtime_ns: int):
    """The transformers config of a GGUF, parsed once per unchanged file (the plan sizes the
    model from it, and the load passes it to transformers)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)


def read_config_json(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a JSON object with a string ``model_type``, or InputError."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not readable JSON ({first_line(error)})") from error
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object, got a {type(config).__name__}")
    if not isinstance(config.get("model_type"), str):
        raise InputError(f"{path} has no model_type string; it is not a transformers config")
    _refuse_quantized(path, config)
    return config


def _refuse_quantized(where: Any, config: dict[str, Any]) -> None:
    """Refuse a checkpoint whose config declares quantized weights (bitsandbytes, GPTQ, AWQ,
    fp8, ...): they are packed or scaled in blocks, so rows cannot be sliced out of them."""
    declared = config.get("quantization_config")
    if declared:
        method = declared.get("quant_method") if isinstance(declared, dict) else None
        method = method if isinstance(method, str) and method else "not named"
        raise InputError(
            f"{where} declares quantized weights (quantization_config, quant_method {method}); "
            "prunenet cannot slice quantized weights. Give the unquantized checkpoint "
            "(float32, float16 or bfloat16) or a GGUF file of the model")


def declared_ffn_width(source: str | os.PathLike) -> int | None:
    """The FFN width a local model declares before it loads: a GGUF's one
    ``feed_forward_length``, or the first of the family's width fields in config.json. None
    where it declares none this way (a Hub id, an unknown family, a width left to its default,
    a nested text config, per-layer widths): the width is then known once the model loads."""
    return _declared(source, "feed_forward_length", lambda family: family.width_fields)


def declared_model_width(source: str | os.PathLike) -> int | None:
    """The residual stream's width (d_model) a local model declares before it loads, as
    :func:`declared_ffn_width` reads the FFN's: a GGUF's ``embedding_length``, or config.json's
    ``hidden_size`` (``n_embd`` for GPT-2)."""
    return _declared(source, "embedding_length", lambda family: ("hidden_size", "n_embd"))


def _declared(source: str | os.PathLike, gguf_key: str,
              fields: Callable[[Any], Sequence[str]]) -> int | None:
    """An integer a local model declares: ``<arch>.<gguf_key>`` of a GGUF, or the first of the
    family's ``fields`` that config.json sets; None where it declares none this way."""
    folder, gguf_file = resolve_source(source)
    if gguf_file is not None:
        reader = gguf_reader(Path(folder) / gguf_file)
        architecture = reader.get_field("general.architecture")
        if architecture is None:
            return None
        field = reader.get_field(f"{architecture.contents()}.{gguf_key}")
        value = field.contents() if field is not None else None
    elif (Path(folder) / "config.json").is_file():
        config = read_config_json(Path(folder))
        try:
            family = family_for(config["model_type"])
        except InputError:
            return None
        value = next((config[name] for name in fields(family)
                      if config.get(name) is not None), None)
    else:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_weights_on_meta(folder: str | os.PathLike) -> None:
    """Let transformers match a safetensors folder's weights to its config without reading any
    tensor data (a model on the meta device); refuse missing or unused weights as loading would."""
    from transformers import AutoModelForCausalLM

    try:
        with _without_load_report():
            _, info = AutoModelForCausalLM.from_pretrained(
                folder, device_map="meta", dtype=torch.float32, output_loading_info=True,
                use_safetensors=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise InputError(f"could not read the weights of {folder}: {first_line(error)}") from error
    report_loading(folder, info)


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Leave out transformers' LOAD REPORT table of weights that did not fit the config:
    :func:`report_loading` refuses the same weights in one line."""
    logger = logging.getLogger("transformers.modeling_utils")

    def no_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    logger.addFilter(no_report)
    try:
        yield
    finally:
        logger.removeFilter(no_report)


def _loading_entry(entry: Any) -> str:
    """A name of transformers' loading info; a mismatch (name, found, expected) with shapes."""
    if isinstance(entry, str):
        return entry
    name, *shapes = entry
    if len(shapes) == 2:
        return f"{name} {list(shapes[0])} (the config needs {list(shapes[1])})"
    return str(name)


def report_loading(source: Any, info: dict[str, Any]) -> None:
    """Turn transformers' loading info into an :class:`InputError` when anything did not fit."""
    problems = []
    for key, what in (("missing_keys", "lacks"), ("unexpected_keys", "holds unused"),
                      ("mismatched_keys", "has wrongly shaped")):
        names = sorted(_loading_entry(entry) for entry in info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{what} {shown}")
    if info.get("error_msgs"):
        problems.append(first_line(Exception(info["error_msgs"][0])))
    if problems:
        raise InputError(f"{source}: the checkpoint does not match its config: "
                         f"{'; '.join(problems)}. prunenet does not fill in or drop weights")


def load_model_and_tokenizer(
    source: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    offload: tuple[int, str | os.PathLike] | None = None,
    staged: bool = False,
    with_tokenizer: bool = True,
):
    """Load a causal LM and its tokenizer (None when the source has none, or when
    ``with_tokenizer`` is False: the caller has it).

    ``source``: a folder with config.json and safetensors, a .gguf file (dequantized to fp32 by
    transformers), the alias ``smollm2-135m``, or a Hub id. ``dtype="auto"`` keeps the checkpoint's
    dtype: the float type most of its weights are stored in, whatever its config declares.
    ``offload`` (resident bytes, a scratch folder), for a model larger than memory: the model
    is dispatched on the CPU by accelerate with as many decoder layers as fit the resident
    bytes held in memory and the rest read from disk each time they run (safetensors shards
    are read in place; the folder is where accelerate may put what it cannot read in place).
    ``staged``: ``source`` is this run's own output, not yet in place (an unfinished output is
    otherwise refused). Raises :class:`InputError` for a missing, unreadable or unsupported
    model.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    folder, gguf_file = resolve_source(source, staged)
    config = load_config(source, trust_remote_code, staged)
    if Path(folder).is_dir() and gguf_file is None:
        validate_weight_files(Path(folder))
    if gguf_file is not None and dtype == "auto":
        dtype = torch.float32
    stored = None
    if dtype == "auto":  # the type the weights are stored in, whatever the config says
        stored = (stored_float_type(Path(folder)) if Path(folder).is_dir() and gguf_file is None
                  else None) or getattr(config, "dtype", None)
    if isinstance(stored, torch.dtype) and stored.itemsize < 2 and stored.is_floating_point:
        dtype = torch.float32  # float8 weights: computed in float32 (exact), saved as stored
    elif isinstance(stored, torch.dtype):
        dtype = stored
    # an unreadable tokenizer is refused before the weights load, not after
    tokenizer = _tokenizer(source, folder, gguf_file, trust_remote_code) if with_tokenizer \
        else None
    _gguf_reader.cache_clear()  # not held beside the weights while they load
    try:
        with _without_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, config=config, gguf_file=gguf_file, dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=None if gguf_file else _prefer_safetensors(folder),
                output_loading_info=True, **_dispatch(offload), **_hub_options(folder, True),
            )  # the config read above: a GGUF's header is not parsed again for it
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        if "ignore_mismatched_sizes" in str(error):  # name the wrongly shaped weights
            with _without_load_report():
                _, info = AutoModelForCausalLM.from_pretrained(
                    folder, gguf_file=gguf_file, device_map="meta", ignore_mismatched_sizes=True,
                    output_loading_info=True, dtype=torch.float32,
                    trust_remote_code=trust_remote_code, **_hub_options(folder, True))
            report_loading(source, info)
        if Path(folder).exists():
            raise InputError(f"could not load the weights of {source}: "
                             f"{first_line(error)}") from error
        raise _hub_error(folder, error) from error
    report_loading(source, info)
    if offload is not None:
        model = _by_layer(model, lambda device_map: AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=True, device_map=device_map, offload_folder=str(offload[1])))
    if dtype == torch.float32 and isinstance(stored, torch.dtype) and stored.itemsize < 2:
        setattr(model, STORAGE_DTYPE, stored)
    if gguf_file is not None:
        # A dequantized GGUF model is an ordinary float model: it saves as plain safetensors
        # and trains (transformers' Trainer refuses a model marked quantized).
        model.hf_quantizer = None
        model.is_quantized = False
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                module.config._is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if offload is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(source: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a model ``source`` (as :func:`load_model_and_tokenizer` names it)
    without its weights; None when it has none."""
    folder, gguf_file = resolve_source(source)
    return _tokenizer(source, folder, gguf_file, trust_remote_code)


def _tokenizer(source, folder, gguf_file: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    present = [name for name in TOKENIZER_FILES if (Path(folder) / name).exists()]
    if gguf_file is None and Path(folder).is_dir() and not present:
        # transformers would build a tokenizer of a handful of special tokens from the config
        # alone (gpt2, opt, gpt_neox, qwen2, gemma): no tokenizer is the truth
        return None
    try:
        return AutoTokenizer.from_pretrained(
            folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
            **_hub_options(folder))
    except Exception as error:  # noqa: BLE001  (tokenizers raises its own exception types)
        if gguf_file is None and present:
            raise InputError(f"{source}: the tokenizer ({', '.join(present)}) cannot be read "
                             f"({first_line(error)}); repair or remove it") from error
        return None


def _by_layer(model: Any, reload: Callable[[dict[str, str]], Any]) -> Any:
    """``model`` dispatched so that no decoder layer shares its disk offload with another:
    where accelerate put the whole model, or the module holding the layers, on disk as one
    piece (it does for a model smaller than its share of memory would suggest), the piece is
    split into its children down to single layers, and the model dispatched again that way
    (nothing is read: offloaded weights stay in their files)."""
    layers = family_for(model.config.model_type).layers
    device_map = getattr(model, "hf_device_map", None) or {}
    refined = dict(device_map)
    whole = [key for key, device in refined.items() if device == "disk"
             and (key == "" or key == layers or layers.startswith(key + "."))]
    while whole:
        key = whole.pop()
        device = refined.pop(key)
        for child, _ in model.get_submodule(key).named_children():
            name = f"{key}.{child}" if key else child
            refined[name] = device
            if name == layers or layers.startswith(name + "."):
                whole.append(name)
    return model if refined == device_map else reload(refined)


def _dispatch(offload: tuple[int, str | os.PathLike] | None) -> dict[str, Any]:
    """from_pretrained's arguments for ``offload`` (resident bytes, scratch folder)."""
    if offload is None:
        return {}
    resident, folder = offload
    return {"device_map": "auto", "max_memory": {"cpu": max(int(resident), 1)},
            "offload_folder": str(folder)}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _prefer_safetensors(folder: str) -> bool | None:
    """Local folders must hold safetensors (never unpickle .bin weights); Hub ids decide online."""
    path = Path(folder)
    if not path.exists():
        return None
    if not any(path.glob("*.safetensors")):
        raise InputError(
            f"{folder} has no .safetensors weights; prunenet does not unpickle .bin files. "
            "Convert them with transformers (save_pretrained) first."
        )
    return True


# ---------------------------------------------------------------------------------------------
# Outputs

MODEL_OUTPUT_FILES = (
    RECORD_NAME, "config.json", "generation_config.json", CARD_NAME, "model*.safetensors",
    "model.safetensors.index.json", "*.gguf", "tokenizer*", "vocab*", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.model",
)


def _is_our_card(path: Path) -> bool:
    try:
        return "\n- prunenet\n" in path.read_text(encoding="utf-8")[:2000]
    except (OSError, UnicodeDecodeError):
        return False


# A folder prunenet wrote: its compression record, and only files a model output holds (its
# card is prunenet's own; a fine-tune's adapter folder holds only the adapter).
is_model_output = folder_of(
    RECORD_NAME, MODEL_OUTPUT_FILES,
    folders={"adapter": folder_of("adapter_config.json", (
        "adapter_config.json", "adapter_model.safetensors", CARD_NAME))},
    check=lambda folder: json_with_format(folder / RECORD_NAME, "prunenet-compression/"),
    files={CARD_NAME: _is_our_card},
)


def check_output_path(out: str | os.PathLike, overwrite: bool, inputs: Sequence[Any] = (), *,
                      what: str = "--out", ours: Recognizer = is_model_output) -> Path:
    """Check one output folder before any work (see :func:`prunenet.io.files.guard_outputs`)."""
    return guard_outputs([Output(out, what, ours=ours)], inputs, overwrite)[0]


STORAGE_DTYPE = "_prunenet_storage_dtype"  # set on models whose weights are stored in float8


def save_plain_checkpoint(model, tokenizer, folder: Path) -> None:
    """save_pretrained model (safetensors) and tokenizer into ``folder`` (no record).

    A model loaded from float8 weights (computed in float32, which holds them exactly) is saved
    in its stored dtype again; the model itself stays in float32."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = getattr(model, STORAGE_DTYPE, None)
    if stored is None:
        model.save_pretrained(folder)
    else:
        try:
            model.to(stored)
            model.save_pretrained(folder)
        finally:
            model.to(torch.float32)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_compressed(
    model, tokenizer, out: str | os.PathLike, record: dict[str, Any], overwrite: bool = False,
    inputs: list[str] = (), safetensors: bool = True,
    also: Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Write a stock checkpoint (unless ``safetensors`` is False), its model card and
    ``prunenet.json`` (last) atomically into ``out``. ``inputs[0]``, when given, is where the
    model came from (for the card); ``also(folder)`` writes further files into the folder being
    staged and returns what the record says of them (merged into ``record``)."""
    out_path = check_output_path(out, overwrite, list(inputs))
    with atomic_folder(out_path, overwrite, ours=is_model_output) as staging:
        if safetensors:
            save_plain_checkpoint(model, tokenizer, staging)
        if also is not None:
            record.update(also(staging))
        copy_terms(inputs[0] if inputs else None, staging)
        write_card(staging, record, inputs[0] if inputs else None)
        write_json_atomic(staging / RECORD_NAME, record)
    return out_path


# The terms a model folder comes under (LICENSE, NOTICE, Llama's USE_POLICY.md, COPYING),
# matched case-blind at the start of the name: a pruned copy is distributed under them too.
TERMS_PREFIXES = ("license", "licence", "notice", "use_policy", "copying")


def copy_terms(source: str | os.PathLike | None, folder: Path) -> None:
    """Copy the license and notice files of a model ``source`` folder into ``folder`` (nothing
    for a file, a Hub id or None)."""
    path = Path(source).expanduser() if source is not None else None
    if path is None or not path.is_dir():
        return
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.name.lower().startswith(TERMS_PREFIXES):
            shutil.copyfile(entry, folder / entry.name)


def write_card(folder: Path, record: dict[str, Any], source: str | os.PathLike | None) -> None:
    """The model card of an output in ``folder`` (see :mod:`prunenet.io.model_card`)."""
    local = source is not None and Path(source).expanduser().exists()  # a folder or a GGUF
    hub_id = str(source) if source is not None and not local \
        and str(source).count("/") == 1 else None
    files = {path.name for path in Path(folder).iterdir()}  # what the card may say loads
    inherited = inherited_card_fields(Path(source).expanduser()) if local else {}
    write_text_atomic(folder / CARD_NAME, render_card(record, inherited, hub_id, files))


# A GGUF's license keys (llama.cpp's converter writes them from the card) -> the card's.
_GGUF_LICENSE_KEYS = {"general.license": "license", "general.license.name": "license_name",
                      "general.license.link": "license_link"}


def gguf_license(path: str | os.PathLike) -> dict[str, str]:
    """A GGUF file's ``general.license``, ``.name`` and ``.link`` (one line each) as the card's
    license keys; those it declares none of or that cannot be read are left out."""
    try:
        reader = gguf_reader(path)
        fields = {key: reader.get_field(name) for name, key in _GGUF_LICENSE_KEYS.items()}
        values = {key: field.contents() for key, field in fields.items() if field is not None}
    except (OSError, ValueError):
        return {}
    values = {key: card_value(value) for key, value in values.items() if isinstance(value, str)}
    return {key: value for key, value in values.items() if value is not None}


def inherited_card_fields(source: str | os.PathLike) -> dict[str, str]:
    """The license keys and ``base_model`` a local model declares: its folder's card
    (:func:`~prunenet.io.model_card.card_fields`), and for a GGUF file, or a folder whose model
    is one GGUF file, that file's (:func:`gguf_license`) where no card names a license."""
    path = Path(source)
    gguf = path if path.suffix.lower() == ".gguf" and path.is_file() else None
    fields = card_fields(path) if gguf is None else {}
    if gguf is None and not (path / "config.json").is_file():
        found = [entry for entry in path.glob("*.gguf") if entry.is_file()]
        gguf = found[0] if len(found) == 1 else None
    if gguf is not None and "license" not in fields:
        fields.update(gguf_license(gguf))
    return fields


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The compression record of a prunenet output; refuses a folder without one."""
    path = Path(folder) / RECORD_NAME
    if not path.exists():
        raise InputError(
            f"{folder} has no {RECORD_NAME}: it is not a complete prunenet output "
            "(an interrupted run, or not made by prunenet)"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not readable JSON ({first_line(error)}); the record is "
                         "damaged") from error
    if not isinstance(record, dict):
        raise InputError(f"{path} must hold a JSON object; the record is damaged")
    problem = _record_problem(record)
    if problem is not None:
        raise InputError(f"{path}: {problem}; the record is damaged")
    if "method" in record:  # every reader sees the method that ran
        record["method"] = method_that_ran(record)
        record.pop("variant", None)
    return record


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a ``prunenet.json`` object that readers would pass on (eval's
    table, a fine-tune's record and teacher), or None."""
    from ..selection import SELECTORS

    form = record.get("format")
    if not isinstance(form, str) or not form.startswith("prunenet-compression/"):
        return f"its format tag {form!r} is not prunenet-compression/N"
    if "method" in record:
        method = record["method"]
        method = method_that_ran(record) if isinstance(method, str) else method
        if method not in SELECTORS:
            return f"method {method!r} is none of prunenet's ({', '.join(SELECTORS)})"
    source = record.get("source")
    if source is not None and (not isinstance(source, str) or not source.strip()):
        return f"source must name the model it was made from, got {source!r}"
    return None


# Records written before methods had one namespace said "prunenet" plus the variant that ran.
_VARIANT_METHODS = {"reference": "prunenet", "self-generated": "self-generated"}


def method_that_ran(compression: dict[str, Any]) -> str:
    """The method a compression record describes, for records of every prunenet version."""
    variant = compression.get("variant")
    if compression.get("method") == "prunenet" and isinstance(variant, str):
        return _VARIANT_METHODS.get(variant, variant)
    return compression["method"]


def convert_model(alias: str, force: bool = False) -> Path:
    """Dequantize a real model's GGUF (:data:`prunenet.assets.MODELS`) once into a plain fp32
    safetensors folder in the cache; return the folder. A conversion of another GGUF than the
    pinned one (made by another prunenet version) is made again like on ``force``, and so is
    one without the card naming the GGUF's terms (made before conversions wrote it; readers
    still read it); a folder a conversion did not write is refused (:class:`OutputError`)."""
    model_entry = MODELS[alias]
    target = cache_dir() / model_entry.folder
    if (not force and (target / "config.json").exists() and (target / CARD_NAME).exists()
            and converted_from_pinned(target, alias)):
        return target
    if not is_conversion(target):
        raise OutputError(f"{target} exists and was not written by prunenet fetch; it is not "
                          "replaced. Move it away (or set PRUNENET_CACHE to another folder)")
    gguf_file = asset_path(model_entry.asset) / model_entry.gguf
    model, tokenizer = load_model_and_tokenizer(str(gguf_file))
    with atomic_folder(target, overwrite=True, ours=is_conversion) as staging:
        save_plain_checkpoint(model, tokenizer, staging)
        write_text_atomic(staging / CARD_NAME,
                          conversion_card(gguf_file.name, gguf_license(gguf_file)))
        (staging / CONVERTED_MARKER).write_text(conversion_marker(alias))
    return target


# A conversion's files are those of any Hugging Face checkpoint: only its manifest, listing
# everything in the folder, tells it from the user's own model.
_is_marked_conversion = folder_of(CONVERTED_MARKER, ("*",), folders={"*": any_tree},
                                  names_suffice=False)


def is_conversion(folder: Path) -> bool:
    """Whether ``folder`` is absent, empty or a model :func:`convert_model` or
    :func:`~prunenet.io.gguf_convert.convert_gguf` wrote (and nothing else since)."""
    return absent_or_empty(folder) or _is_marked_conversion(folder)
