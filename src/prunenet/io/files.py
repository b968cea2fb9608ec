"""Everything prunenet writes goes through here: path guards, atomic files and folders, locks.

The rules, checked before any work by :func:`guard_outputs`:

- a written path never equals, contains or lies inside a path the command reads (after
  resolving ``~``, ``..`` and symlinks, and as files on disk: a bind mount or a hard link is
  the same file by another name; what the symlinks inside an input folder point at is read
  too), and no two written paths overlap;
- an output folder is never the current folder nor holds it (putting it in place renames the
  folder there away);
- an existing output is replaced only with ``overwrite``, and only when it is something prunenet
  made (each output names a recognizer: a model folder with ``prunenet.json``, a run record, a
  report, a policy file with its header...); an arbitrary file or folder is never replaced, and a
  folder holding anything prunenet did not write there is never deleted (every folder prunenet
  commits lists its contents in :data:`MANIFEST_NAME`);
- missing parent folders are created for every output alike, when it is written.

Outputs are staged in hidden siblings and renamed into place complete (:func:`atomic_folder`,
:func:`atomic_file`); staging names stay within the file system's 255-byte name limit.
This module imports nothing of prunenet's model code.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, NumericalError, OutputError

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
_RANDOM_SUFFIX = 8  # characters tempfile appends to a prefix
STAGING_TAG = "tmp"


def resolved(path: str | os.PathLike, what: str = "path") -> Path:
    """``path`` with ``~``, ``..`` and symlinks resolved (a symlink loop: :class:`InputError`)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as error:  # RuntimeError: "Symlink loop from ..."
        raise InputError(f"{what} {path} cannot be resolved: {error}") from error


def _fitting_name(name: str, before: str, after: str, reserve: int = 0) -> str:
    """``before + name + after``, or, when that would pass :data:`NAME_MAX` bytes less
    ``reserve``, ``name`` cut and marked with a hash of the whole name (so two long names never
    share the result)."""
    whole = f"{before}{name}{after}"
    if len(whole.encode()) + reserve <= NAME_MAX:
        return whole
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    room = NAME_MAX - reserve - len(f"{before}.{digest}{after}".encode())
    cut = name.encode()[:room].decode(errors="ignore")
    return f"{before}{cut}.{digest}{after}"


def sibling_prefix(target: Path, tag: str) -> str:
    """A hidden name prefix beside ``target`` (``.NAME.TAG-``), short enough for any valid NAME
    to take the random suffix tempfile adds."""
    return _fitting_name(target.name, ".", f".{tag}-", _RANDOM_SUFFIX)


def sibling_path(target: str | os.PathLike, suffix: str) -> Path:
    """``target`` + ``suffix`` (``OUT.work``), the name cut and hashed when it would pass
    :data:`NAME_MAX` bytes, so a working file exists for every valid output name."""
    target = Path(os.path.abspath(Path(target).expanduser()))  # "." and ".." have no name
    if not target.name:
        raise OutputError(f"{target} has no name to write beside; choose a folder or file name")
    return target.with_name(_fitting_name(target.name, "", suffix))


def is_staging_name(name: str) -> bool:
    """Whether ``name`` is a hidden staging folder or file of an unfinished output."""
    return name.startswith(".") and f".{STAGING_TAG}-" in name


# --- what prunenet makes --------------------------------------------------------------------

Recognizer = Callable[[Path], bool]


# Every folder prunenet commits lists what it wrote (relative POSIX paths, folders ending in
# "/"): on --overwrite, a folder with this list is prunenet's only while everything in it is
# listed, so a file or folder the user added later, whatever its name, is never deleted.
MANIFEST_NAME = ".prunenet-files"


def write_manifest(folder: Path) -> None:
    """List everything under ``folder`` in its :data:`MANIFEST_NAME` (the list itself aside)."""
    manifest = folder / MANIFEST_NAME
    entries = sorted(path.relative_to(folder).as_posix() + ("/" if path.is_dir() else "")
                     for path in folder.rglob("*") if path != manifest)
    manifest.write_text(json.dumps(entries, indent=0) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> frozenset[str] | None:
    """The paths ``folder``'s manifest lists; None without one (a folder written before
    manifests, judged by its names alone); empty when it is damaged (nothing counts as
    listed)."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file() or manifest.is_symlink():
        return None
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return frozenset()
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        return frozenset()
    return frozenset(entries)


def changed_since_written(folder: Path) -> list[str]:
    """The files of a committed ``folder`` (relative POSIX paths) modified after prunenet
    listed them in its :data:`MANIFEST_NAME`, which it writes last: a user's edits."""
    manifest = folder / MANIFEST_NAME
    listed = read_manifest(folder)
    if not listed:
        return []
    written = manifest.stat().st_mtime_ns
    return sorted(entry for entry in listed if not entry.endswith("/")
                  and (folder / entry).is_file()
                  and (folder / entry).stat().st_mtime_ns > written)


def _all_listed(folder: Path, listed: frozenset[str], prefix: str,
                later: Callable[[Path], bool], still_ours: Callable[[Path], bool]) -> bool:
    """Whether everything under ``folder`` is in ``listed`` (paths below ``prefix``) and its
    top-level files pass ``still_ours`` (a test of the folder's own files, such as its card,
    not of their namesakes in subfolders: a fine-tune's adapter/README.md is peft's card),
    but for top-level folders added after the commit that carry their own list and that
    ``later`` recognizes (a report inside a run record)."""
    for entry in folder.iterdir():
        path = prefix + entry.name
        if entry.is_symlink():
            return False
        if entry.is_dir():
            if path + "/" in listed:
                if not _all_listed(entry, listed, path + "/", later, still_ours):
                    return False
            elif prefix or read_manifest(entry) is None or not later(entry):
                return False  # only an output committed on its own may have joined later
        elif not entry.is_file() or not (path == MANIFEST_NAME or path in listed
                                         and (bool(prefix) or still_ours(entry))):
            return False
    return True


def folder_of(marker: str | None, allowed: Sequence[str],
              folders: dict[str, Recognizer] | None = None,
              check: Callable[[Path], bool] | None = None,
              files: dict[str, Callable[[Path], bool]] | None = None,
              names_suffice: bool = True,
              joined_later: dict[str, Recognizer] | None = None) -> Recognizer:
    """A recognizer for a folder prunenet wrote: it holds ``marker`` (passing ``check``); every
    file passes the test ``files`` gives its name, if any (a model card still prunenet's own);
    and, where it has a manifest (:data:`MANIFEST_NAME`), it holds nothing the manifest does
    not list but the subfolders ``joined_later`` allows (below). A folder without a
    manifest (written before them, or by a writer that keeps none) is judged by names, unless
    ``names_suffice`` is false (names a user's own folder may have too: a report's pages, a
    model's files): every file matches one of the ``allowed`` patterns; every subfolder's name
    matches a pattern of ``folders`` and passes its recognizer. Only the folders
    ``joined_later`` names (a record's own report folder) may join a folder with a manifest
    after its commit, each an output of its own; any other folder found there, even another
    clean prunenet output the user put inside, makes the folder not prunenet's to replace.
    Symlinks never count as prunenet's."""

    def still_ours(entry: Path) -> bool:  # a file whose content shows whose it is
        test = (files or {}).get(entry.name)
        return test is None or test(entry)

    def allowed_file(entry: Path) -> bool:
        return any(fnmatch.fnmatch(entry.name, pattern) for pattern in allowed) \
            and still_ours(entry)

    def subfolder(entry: Path) -> bool:
        test = next((recognizer for pattern, recognizer in (folders or {}).items()
                     if fnmatch.fnmatch(entry.name, pattern)), None)
        return test is not None and test(entry)

    def later(entry: Path) -> bool:
        test = (joined_later or {}).get(entry.name)
        return test is not None and test(entry)

    def recognize(folder: Path) -> bool:
        if folder.is_symlink() or not folder.is_dir():
            return False
        if marker is not None and (not (folder / marker).is_file()
                                   or (check is not None and not check(folder))):
            return False
        listed = read_manifest(folder)
        if listed is not None:
            return _all_listed(folder, listed, "", later, still_ours)
        if not names_suffice:
            return False
        for entry in folder.iterdir():
            if entry.is_symlink():
                return False
            if entry.is_dir():
                if not subfolder(entry):
                    return False
            elif not (entry.is_file() and allowed_file(entry)):
                return False
        return True

    return recognize


def any_tree(folder: Path) -> bool:
    """A recognizer for a folder of any files and subfolders, with no symlink anywhere."""
    return folder_of(None, ("*",), folders={"*": any_tree})(folder)


def absent_or_empty(path: Path) -> bool:
    """Whether nothing is at ``path`` (not even a dangling symlink) or it is an empty folder."""
    if not path.exists() and not path.is_symlink():
        return True
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def json_with_format(path: Path, prefix: str) -> bool:
    """Whether ``path`` is a JSON object whose ``format`` starts with ``prefix``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(prefix)


def never(_path: Path) -> bool:
    return False


# --- the guard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One path a command will write: ``what`` names it in messages (``--out``), ``folder`` says
    whether it is a folder or a file, ``ours`` recognizes an existing one prunenet made.
    ``working`` marks prunenet's own working state beside an output (a resumable training
    state, a fine-tune's checkpoints): an existing one is used or replaced without
    ``--overwrite`` (``--resume`` decides), but only when ``ours`` recognizes it. ``within``
    is the one prunenet output it may be written into (a run record's own report folder)."""

    path: str | os.PathLike
    what: str
    folder: bool = True
    ours: Recognizer = never
    working: bool = False
    within: str | os.PathLike | None = None


LINKS_LOOKED_AT = 10_000
"""Folders of one input searched for symlinks (a model or a record has one or two)."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _identities(path: Path) -> list[tuple[int, int]]:
    """The (device, inode) of ``path``'s existing ancestors, nearest first."""
    found = (_identity(parent) for parent in path.parents)
    return [identity for identity in found if identity is not None]


# Folders no output may be, lie inside or contain, with what they are: each a function the
# module that owns such folders registers when it is imported (the asset cache's, by
# prunenet.assets, which the package imports), read at every check.
OFF_LIMITS: list[Callable[[], list[tuple[Path, str]]]] = []


def _overlap(a: Path, b: Path) -> str | None:
    """How the resolved path ``a`` stands to ``b``: by name, then as files on disk (one
    folder reached by two names, as a bind mount or a hard-linked file gives)."""
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    first, second = _identity(a), _identity(b)
    if first is not None and first == second:
        return "is"
    if second is not None and second in _identities(a):
        return "lies inside"
    if first is not None and first in _identities(b):
        return "contains"
    return None


def _current_folder() -> Path | None:
    """The current folder, resolved; None where it was removed."""
    try:
        return Path.cwd().resolve()
    except OSError:
        return None


def _linked_targets(folder: Path) -> list[Path]:
    """What the symlinks inside an input folder point at (a folder of links to another
    model's files reads those files): resolved, those that exist."""
    targets = []
    for count, (root, names, files) in enumerate(os.walk(folder)):
        if count > LINKS_LOOKED_AT:
            break
        for name in names + files:
            entry = Path(root) / name
            if entry.is_symlink():
                with contextlib.suppress(OSError, RuntimeError):
                    target = entry.resolve()
                    if target.exists():
                        targets.append(target)
    return targets


def guard_outputs(outputs: Iterable[Output | None], inputs: Iterable[str | os.PathLike | None],
                  overwrite: bool) -> list[Path]:
    """Check every output of a command against every input and each other; see the module doc.

    ``inputs`` that do not exist locally (Hub ids) are skipped; ``None`` entries of either are
    ignored. Returns the resolved output paths in order (their missing parent folders are made
    when they are written).
    Raises :class:`OutputError` (or :class:`InputError` for unresolvable paths) before anything
    is written.
    """
    wanted = [output for output in outputs if output is not None]
    read = []
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        read.append(resolved(source, "input"))
        if read[-1].is_dir():
            read += _linked_targets(read[-1])
    for output in wanted:
        if not isinstance(output.path, (str, os.PathLike)):
            raise OutputError(f"{output.what} must be a path, got {output.path!r}")
        if not str(output.path).strip():
            raise OutputError(f"{output.what} is empty; give a path")
        try:
            str(output.path).encode()
        except UnicodeEncodeError:
            raise OutputError(f"{output.what} {output.path!r} is not valid UTF-8; choose a name "
                              "of UTF-8 characters") from None
    paths = [resolved(output.path, output.what) for output in wanted]
    # What no output may be, lie inside or contain: fetch's folders, then what the command reads.
    kept_apart = [*(place for places in OFF_LIMITS for place in places()),
                  *((source, f"the input {source}; prunenet never writes into, over or around "
                     "what it reads") for source in read)]
    for output, path in zip(wanted, paths):
        if not path.name:
            raise OutputError(f"{output.what} {output.path} is the root folder; choose a name")
        if is_staging_name(path.name):
            raise OutputError(f"{output.what} {path.name} looks like prunenet's hidden staging "
                              "names (.NAME.tmp-...); choose another name")
        if output.working and Path(output.path).expanduser().is_symlink():
            raise OutputError(f"{output.what} {output.path} is a symlink; prunenet's working "
                              "files are never written through links. Remove it")
        if len(path.name.encode()) > NAME_MAX:
            raise OutputError(f"{output.what} name {path.name[:40]}... is longer than "
                              f"{NAME_MAX} bytes; choose a shorter name")
        for place, description in kept_apart:
            relation = _overlap(path, place)
            if relation is not None:
                raise OutputError(f"{output.what} {path} {relation} {description}. Choose "
                                  f"another {output.what}")
    for (first, a), (second, b) in ((x, y) for i, x in enumerate(zip(wanted, paths))
                                    for y in list(zip(wanted, paths))[i + 1:]):
        relation = _overlap(a, b)
        if relation is not None:
            raise OutputError(f"{first.what} {a} {relation} {second.what} {b}; they must be "
                              "separate, neither inside the other")
    for output, path in zip(wanted, paths):
        _check_not_inside_an_output(output, path)
        _check_existing(output, path, overwrite)
    here = _current_folder()
    for output, path in zip(wanted, paths):
        _check_not_around(output, path, here)
        _check_parent(output, path)
    return paths


def _check_not_around(output: Output, path: Path, here: Path | None) -> None:
    """Refuse an output folder that is or holds the current folder ``here``: renamed away when
    the output is put in place, it would be gone under the shell and the run."""
    relation = _overlap(path, here) if here is not None and output.folder \
        and not output.working else None
    if relation in ("is", "contains"):
        raise OutputError(f"{output.what} {path} {relation} the current folder; an output is put "
                          "in place by renaming a finished folder onto it, which would leave the "
                          "shell and this run in a removed folder. Run prunenet from another "
                          "folder" + (f", or give {output.what} a new folder's name"
                                      if relation == "is" else ""))


def _check_not_inside_an_output(output: Output, path: Path) -> None:
    """Refuse an output inside a folder prunenet committed (one holding its manifest): writing
    there would change that output, which is then no longer prunenet's to replace."""
    allowed = resolved(output.within, output.what) if output.within is not None else None
    for folder in path.parents:
        if (folder / MANIFEST_NAME).is_file() and folder != allowed:
            raise OutputError(f"{output.what} {path} lies inside {folder}, an output prunenet "
                              "wrote; writing there would change that output. Choose another "
                              f"{output.what}")


def _check_existing(output: Output, path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if output.working:
        if not output.ours(path):
            raise OutputError(f"{output.what} {path} exists and was not written by prunenet; "
                              "move it away, prunenet replaces only its own working files")
        return
    if output.folder and not path.is_dir():
        raise OutputError(f"{output.what} {path} exists and is not a folder; it is not replaced")
    if not output.folder and not path.is_file():
        raise OutputError(f"{output.what} {path} is "
                          f"{'a folder' if path.is_dir() else 'not a regular file'}; give the "
                          "name of a file to write")
    if output.folder and os.path.ismount(path):
        raise OutputError(f"{output.what} {path} is a mount point; an output is put in place by "
                          "renaming a finished folder onto it, which a mount point refuses. "
                          "Give a folder inside it")
    if output.folder and not any(path.iterdir()):
        return  # an empty folder the user made for us
    if not output.ours(path):  # said first: --overwrite would not help
        raise OutputError(
            f"{output.what} {path} exists and was not written by prunenet (or holds other "
            "files too); prunenet replaces only its own outputs. Choose another "
            f"{output.what}"
        )
    if not overwrite:
        raise OutputError(f"{output.what} {path} already exists; pass --overwrite to replace it")


def _check_parent(output: Output, path: Path) -> None:
    """Refuse an output whose folder cannot be made or written to. Nothing is created here:
    the missing folders above an output are made when it is written, so a command refused
    later leaves none behind."""
    parent = existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create the folder {parent} for {output.what}: {existing} is "
                          "not a folder")
    try:  # a file with no name where the filesystem allows (O_TMPFILE), else one unlinked at once
        with tempfile.TemporaryFile(dir=existing, prefix=".prunenet-write-check-"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to {existing}: no file can be created there "
                          f"({error.strerror or error}; read-only, or not a place for files)"
                          ) from None


# --- atomic writing -------------------------------------------------------------------------

_committed: list[Path] = []  # every commit of this process, a path again at each replacement


def commits() -> int:
    """How many outputs this process has put in place so far (replacements counted)."""
    return len(_committed)


def committed_outputs(since: int = 0) -> list[Path]:
    """The outputs this process put in place after its first ``since`` commits (folders and
    files, not the files written inside a staged folder), each once, in the order of their
    first commit: what an interrupted command did finish."""
    return list(dict.fromkeys(_committed[since:]))


def _note_committed(path: Path) -> None:
    """Note a commit of ``path`` (again each time it is replaced: a training state after each
    episode, an output a later command in the same process replaces)."""
    if not any(is_staging_name(part) for part in path.parts):
        _committed.append(path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_readable(path: str | os.PathLike) -> None:
    """mkstemp makes 0600 files; outputs get the usual 0644 less the process umask."""
    os.chmod(path, 0o644 & ~_umask())


@contextlib.contextmanager
def folders_made_for(path: Path) -> Iterator[None]:
    """Make the missing folders above ``path`` for the block; if it fails, remove those it
    made, innermost first, where still empty (an output finished beside a failed one keeps the
    folders it lies in)."""
    made = []
    for parent in Path(path).parents:
        if parent.exists() or parent.is_symlink():
            break
        made.append(parent)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in made:  # innermost first; one never made (mkdir failed) is skipped
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
        raise


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP for the length of the block (a few renames that must
    all happen or none): one that arrives meanwhile is noted and raised again, to the handler
    in place before, when the block ends. (Python runs signal handlers in the main thread, so
    the handlers are swapped there; a mask would not do: another thread would take the
    signal.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            handler = signal.getsignal(signum)
            if handler is not None:  # None: set from C, which Python could not put back
                previous[signum] = handler
                signal.signal(signum, lambda number, frame: arrived.append(number))
        yield
    finally:
        interrupt = None
        for signum, handler in previous.items():  # every one put back, whatever is raised
            try:
                signal.signal(signum, handler)
            except BaseException as error:  # a pending handler ran as the call began
                interrupt = interrupt or error
                signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)
        if interrupt is not None:
            raise interrupt


def remove_unfinished(folder: Path) -> None:
    """Remove the unfinished output or scratch ``folder`` whole: an interrupt that arrives
    meanwhile (Ctrl-C pressed again) is held until it is gone, then raised."""
    with signals_held():
        shutil.rmtree(folder, ignore_errors=True)


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace the folder ``out`` by ``staging``: the previous folder is moved aside, the new
    one renamed in, and the previous one removed; if the second rename fails, the previous
    folder is put back (signals are held, so an interrupt cannot fall between the renames nor
    before the previous folder is removed)."""
    old = Path(tempfile.mkdtemp(prefix=sibling_prefix(out, "old"), dir=out.parent))
    with signals_held():  # an interrupt held meanwhile arrives once the old folder is gone
        try:
            os.rename(out, old / "previous")
        except BaseException:
            old.rmdir()
            raise
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(old / "previous", out)
            old.rmdir()
            raise
        _note_committed(out)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on a hidden, empty lock file beside ``out`` while the output is put
    in place. The holder removes the file before it lets go, so none stays behind, not even
    one a killed run left (the next holder removes it); a run that got the lock on a file
    removed meanwhile takes it again on the file now at the path, so two runs never hold it at
    once. Never follows a link, never truncates, never removes a file that holds anything."""
    lock_path = out.parent / (sibling_prefix(out, "lock") + "0")
    while True:
        try:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as error:
            raise OutputError(f"{lock_path} is in the way of the output lock ({error.strerror}); "
                              "remove it") from error
        try:
            held = os.fstat(handle)
            if not stat.S_ISREG(held.st_mode) or held.st_size:
                raise OutputError(f"{lock_path} is in the way of the output lock (it is not an "
                                  "empty file); remove it")
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(handle)
            raise
        if current is not None and os.path.samestat(held, current):
            break
        os.close(handle)  # the previous holder removed that file: lock the one there now
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(handle)


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False,
                  ours: Recognizer | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    On any exception (Ctrl-C included) the temporary folder is removed and ``out`` is untouched.
    A non-empty ``out`` that appeared while the work ran is replaced only with ``overwrite``,
    and, when ``ours`` is given, only if ``ours`` recognizes it (checked again at the rename).
    """
    out = Path(out)
    with folders_made_for(out), _held_staging_folder(out) as staging:
        try:
            yield staging
            write_manifest(staging)
            os.chmod(staging, 0o755 & ~_umask())  # mkdtemp makes 0700; as mkdir makes folders
            for file in staging.rglob("*"):
                if file.is_file():
                    make_readable(file)
            with output_lock(out):  # two runs finishing at once: one wins, the other errors
                if out.exists():
                    if any(out.iterdir()) and not overwrite:
                        raise OutputError(
                            f"output {out} was written by another run while this one worked; "
                            "not replaced (pass --overwrite to replace it)"
                        )
                    if ours is not None and any(out.iterdir()) and not ours(out):
                        raise OutputError(f"output {out} holds files prunenet did not write "
                                          "(they appeared while this run worked); not replaced")
                    _swap_into_place(staging, out)
                else:
                    os.rename(staging, out)
                    _note_committed(out)
        except BaseException:
            remove_unfinished(staging)
            raise


@contextlib.contextmanager
def scratch_folder(out: Path) -> Iterator[Path]:
    """A hidden working folder beside the output ``out`` for the length of the block (what a
    run sets aside on disk before it writes ``out``), removed afterwards whatever happens."""
    out = Path(out)
    with folders_made_for(out), _held_staging_folder(out) as folder:
        try:
            yield folder
        finally:
            remove_unfinished(folder)


@contextlib.contextmanager
def _held_staging_folder(out: Path) -> Iterator[Path]:
    """A new hidden staging folder beside ``out``, locked (flock) for as long as its run lives.

    A run the system kills outright (SIGKILL, the out-of-memory killer) cleans nothing up: its
    staging folder, as large as the model it was writing, stayed beside the output for good.
    Such folders lose their lock with their process, so before making its own, a run removes
    those beside the same output whose lock it can take. Both happen under the output lock, so
    no run ever sees another's new folder before it is locked."""
    prefix = sibling_prefix(out, STAGING_TAG)
    with output_lock(out):
        _remove_abandoned(out.parent, prefix)
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        try:
            handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            folder.rmdir()
            raise
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without locks: the folder is only never swept
            pass
    try:
        yield folder
    finally:
        os.close(handle)


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the staging folders named ``prefix`` + tempfile's suffix in ``parent`` whose
    lock is free: their run was killed before it could remove them. A folder whose lock is held
    (its run is alive) or cannot be tried, a link, a file, or any other name is left alone."""
    pattern = re.compile(re.escape(prefix) + f"[a-z0-9_]{{{_RANDOM_SUFFIX}}}")
    try:
        entries = [entry for entry in os.scandir(parent) if pattern.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            handle = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue
        finally:
            os.close(handle)  # closing drops the lock just taken, if it was
        log.info("removing %s, left by a run that was killed before it could clean up",
                 entry.path)
        remove_unfinished(Path(entry.path))


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool = True,
                ours: Recognizer | None = None) -> Iterator[Path]:
    """Yield a temporary sibling file name; on success it replaces ``path`` in one rename.

    An existing ``path`` is replaced only with ``overwrite`` and, when ``ours`` is given, only
    if it recognizes the file; the check and the rename happen under the output lock, so a file
    that appeared while the work ran is never lost (:class:`OutputError`).
    """
    path = Path(path)
    with folders_made_for(path):
        handle, tmp = tempfile.mkstemp(prefix=sibling_prefix(path, STAGING_TAG), dir=path.parent)
        os.close(handle)
        try:
            yield Path(tmp)
            make_readable(tmp)  # after the writer, which may have made the file anew (0600)
            with output_lock(path):
                if path.exists() or path.is_symlink():
                    if not overwrite:
                        raise OutputError(f"{path} was written by another run while this one "
                                          "worked; not replaced (pass --overwrite to replace "
                                          "it)")
                    if ours is not None and not ours(path):
                        raise OutputError(f"{path} was replaced by a file prunenet did not "
                                          "write while this run worked; not replaced")
                os.replace(tmp, path)
                _note_committed(path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_json_atomic(path: Path, data: Any, ours: Recognizer | None = None) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically; an existing file is
    replaced only when ``ours`` (if given) recognizes it."""
    try:  # strict JSON: a NaN or Inf result is refused, never written as a bare NaN
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as error:
        if "Out of range float" not in str(error):
            raise
        raise NumericalError(f"{Path(path).name} would hold a NaN or Inf value; nothing was "
                             "written") from error
    with atomic_file(Path(path), ours=ours) as tmp:
        with open(tmp, "w") as stream:
            stream.write(text + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text)
