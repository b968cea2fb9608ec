"""Loading models (HF folder, GGUF, Hub id), saving stock checkpoints and policies, atomically.

Outputs are written into a hidden temporary sibling and renamed into place once complete; the
compression record ``prunenet.json`` is written last, so a folder without it is not a finished
output. Weights are read only through safetensors (or transformers' own safe loaders); remote code
runs only when the caller asks for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InputError, OutputError, PolicyMismatchError
from .families import family_for
from .policy import PrunePolicy

RECORD_NAME = "prunenet.json"
POLICY_FORMAT = "prunenet-policy/1"
POLICY_HEADER_KEY = "prunenet"
MODEL_ALIASES = {"smollm2-135m": "the default real model, SmolLM2-135M-Instruct (prunenet fetch)"}


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source and source.count("/") != 1


def resolve_source(source: str | os.PathLike) -> tuple[str, str | None]:
    """Return ``(folder_or_hub_id, gguf_file_name_or_None)`` for a user's MODEL argument."""
    text = str(source)
    if text in MODEL_ALIASES:
        from .assets import smollm2_path

        return str(smollm2_path()), None
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(path.parent), path.name
        raise InputError(f"{path} is a file but not a .gguf; pass a model folder or a GGUF file")
    if path.is_dir():
        if ".tmp-" in path.name and path.name.startswith("."):
            raise InputError(f"{path} is an unfinished prunenet output (interrupted); delete it")
        if (path / "config.json").exists():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        raise InputError(f"{path} is not a model folder: it has no config.json")
    if path.exists() or _looks_like_path(text) or text.count("/") > 1:
        raise InputError(f"model path {text} does not exist")
    return text, None  # a Hub id


def _hub_error(source: str, error: Exception) -> InputError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return InputError(
        f"could not load {source!r}: it is not a local path, and fetching it as a Hugging Face Hub "
        f"id failed ({'offline mode' if offline else type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Pass a local model folder or GGUF "
        "file, or connect to the Hub."
    )


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def validate_safetensors(path: Path) -> dict[str, Any]:
    """Check a safetensors file's header against its size before anything maps it; return it.

    Rejects (with :class:`InputError` naming the file) a truncated file, a header that does not
    parse, and tensors whose declared shape and dtype do not match their byte ranges or point past
    the end of the file, so lying headers never cause a crash or a huge allocation.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputError(f"{path} is truncated: {size} bytes, not a safetensors file")
        header_length = int.from_bytes(prefix, "little")
        if header_length > min(_MAX_HEADER_BYTES, size - 8):
            raise InputError(f"{path}: header claims {header_length} bytes, file has {size}; "
                             "the file is truncated or not safetensors")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: unreadable safetensors header ({error})") from error
    data_bytes = size - 8 - header_length
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for dimension in shape:
                if int(dimension) < 0:
                    raise ValueError("negative dimension")
                count *= int(dimension)
            expected = count * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry") from error
        if end - start != expected or not 0 <= start <= end <= data_bytes:
            raise InputError(
                f"{path}: tensor {name!r} declares shape {shape} {dtype} ({expected} bytes) at "
                f"[{start}, {end}) but the file holds {data_bytes} data bytes; "
                "the file is truncated or its header lies"
            )
    return header


def validate_gguf(path: Path) -> None:
    """Parse a GGUF file's header and tensor table; a damaged file is an :class:`InputError`."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} extends past the end of the file")
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError) as error:
        raise InputError(f"{path} is not a valid GGUF file ({error})") from error


def validate_weight_files(folder: Path) -> None:
    """Check every safetensors file of a local model folder, and its shard index if any.

    Shard names in ``model.safetensors.index.json`` must be plain file names inside ``folder``.
    """
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"{index_file} is not a valid shard index ({error})") from error
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise InputError(f"{index_file} names shard {shard!r} outside the model folder")
            if not (folder / shard).is_file():
                raise InputError(f"{index_file} names shard {shard}, which is missing")
    for file in sorted(folder.glob("*.safetensors")):
        validate_safetensors(file)


def load_config(source: str | os.PathLike, trust_remote_code: bool = False):
    """The transformers config of ``source``, with its family checked before any weight loads."""
    from transformers import AutoConfig

    folder, gguf_file = resolve_source(source)
    if gguf_file is not None:
        validate_gguf(Path(folder) / gguf_file)
    try:
        config = AutoConfig.from_pretrained(
            folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        if Path(folder).exists():
            raise InputError(f"{source} is not a readable model: {error}") from error
        raise _hub_error(folder, error) from error
    family_for(getattr(config, "model_type", None))
    return config


def load_model_and_tokenizer(
    source: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer (None when the source has none).

    ``source``: a folder with config.json and safetensors, a .gguf file (dequantized to fp32 by
    transformers), the alias ``smollm2-135m``, or a Hub id. ``dtype="auto"`` keeps the checkpoint's
    dtype. Raises :class:`InputError` for a missing, unreadable or unsupported model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve_source(source)
    load_config(source, trust_remote_code)
    if Path(folder).is_dir() and gguf_file is None:
        validate_weight_files(Path(folder))
    if gguf_file is not None and dtype == "auto":
        dtype = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if gguf_file else _prefer_safetensors(folder),
        )
    except (OSError, ValueError, RuntimeError) as error:
        if Path(folder).exists():
            raise InputError(f"could not load the weights of {source}: {error}") from error
        raise _hub_error(folder, error) from error
    if gguf_file is not None:
        # A dequantized GGUF model must save as ordinary safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


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
# Atomic outputs


def check_output_path(out: str | os.PathLike, overwrite: bool, inputs: list[str] = ()) -> Path:
    """Validate an output folder before any work: not inside an input, not clobbering a model."""
    out_path = Path(out).expanduser().resolve()
    for source in inputs:
        source_path = Path(source).expanduser()
        if not source_path.exists():
            continue
        source_path = source_path.resolve()
        if out_path == source_path or source_path in out_path.parents:
            raise OutputError(
                f"output {out_path} is inside the input {source_path}; "
                "prunenet never writes into its input. Choose another --out."
            )
    if out_path.exists():
        if not out_path.is_dir():
            raise OutputError(f"output {out_path} exists and is not a folder")
        if any(out_path.iterdir()) and not overwrite:
            raise OutputError(f"output {out_path} already exists; pass --overwrite to replace it")
    parent = out_path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder {parent} for {out_path}: {error}") from error
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}: permission denied or read-only")
    return out_path


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    On any exception (Ctrl-C included) the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        for file in staging.rglob("*"):
            if file.is_file():
                _readable(str(file))
        with _output_lock(out):  # two runs finishing at once: one wins, the other errors
            if out.exists():
                if any(out.iterdir()) and not overwrite:
                    raise OutputError(
                        f"output {out} was written by another run while this one worked; "
                        "not replaced (pass --overwrite to replace it)"
                    )
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old / "previous")
                os.rename(staging, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on ``.NAME.lock`` beside ``out`` while the output is put in place."""
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()


def _readable(tmp: str) -> None:
    """mkstemp makes 0600 files; outputs get the usual 0644 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o644 & ~umask)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    _readable(tmp)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=True)
            stream.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_plain_checkpoint(model, tokenizer, folder: Path) -> None:
    """save_pretrained model (safetensors) and tokenizer into ``folder`` (no record)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_compressed(
    model, tokenizer, out: str | os.PathLike, record: dict[str, Any], overwrite: bool = False,
    inputs: list[str] = (),
) -> Path:
    """Write a stock checkpoint plus ``prunenet.json`` (last) atomically into ``out``."""
    out_path = check_output_path(out, overwrite, list(inputs))
    with atomic_folder(out_path, overwrite) as staging:
        save_plain_checkpoint(model, tokenizer, staging)
        write_json_atomic(staging / RECORD_NAME, record)
    return out_path


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The compression record of a prunenet output; refuses a folder without one."""
    path = Path(folder) / RECORD_NAME
    if not path.exists():
        raise InputError(
            f"{folder} has no {RECORD_NAME}: it is not a complete prunenet output "
            "(an interrupted run, or not made by prunenet)"
        )
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Policies


def policy_checksum(policy: PrunePolicy) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_policy(policy: PrunePolicy, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Save a policy as safetensors; ``metadata`` (JSON-able) goes into the header. Atomic."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(
            f"policy output {path} is a folder; give a file name (e.g. policy.safetensors)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # One header key: safetensors writes several in a random order, breaking byte-identity.
    header = {POLICY_HEADER_KEY: json.dumps({
        "format": POLICY_FORMAT,
        "d_model": policy.d_model,
        "d_ff": policy.d_ff,
        "checksum": policy_checksum(policy),
        "metadata": metadata,
    }, sort_keys=True)}
    tensors = {
        name: tensor.detach().cpu().contiguous() for name, tensor in policy.state_dict().items()
    }
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(handle)
    _readable(tmp)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_policy(path: str | os.PathLike) -> tuple[PrunePolicy, dict[str, Any]]:
    """Load a policy saved by :func:`save_policy`; returns ``(policy, metadata)``.

    Raises :class:`InputError` for a missing, corrupted or non-safetensors file (pickles are never
    loaded) and :class:`PolicyMismatchError` when its tensors do not match its declared shapes.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"policy file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(
            f"{path} is not a readable safetensors policy file ({error}); "
            "policies are saved by `prunenet train-policy`"
        ) from error
    try:
        header = json.loads(header[POLICY_HEADER_KEY])
        is_policy = header.get("format") == POLICY_FORMAT
    except (KeyError, ValueError, AttributeError):
        is_policy = False
    if not is_policy:
        raise InputError(f"{path} is a safetensors file but not a prunenet policy (no format tag)")
    try:
        d_model, d_ff = int(header["d_model"]), int(header["d_ff"])
        metadata = dict(header.get("metadata", {}))
    except (KeyError, ValueError, TypeError) as error:
        raise InputError(f"{path}: damaged policy header ({error})") from error
    expected = {"projection": (d_ff, d_model), "bias": (d_ff,), "row_weights": (d_ff,)}
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if shapes != expected:
        raise PolicyMismatchError(f"{path}: tensors {shapes} do not match the header {expected}")
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InputError(f"{path}: policy tensor {name} holds NaN or Inf")
    policy = PrunePolicy.from_tensors(tensors)
    if header.get("checksum") and header["checksum"] != policy_checksum(policy):
        raise InputError(f"{path}: checksum mismatch; the policy file is corrupted")
    return policy, metadata
