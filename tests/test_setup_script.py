"""scripts/setup.sh on machines that differ from ours, with stub interpreters in place of Python.

Each stub answers ``-c`` snippets as a Python of its version (the real interpreter runs them with
``sys.version_info`` replaced), makes a stub ``.venv`` on ``-m venv`` and logs every other call,
so a set-up runs in a fraction of a second and installs nothing.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STUB = """#!/usr/bin/env bash
# A Python {major}.{minor}{pip_note}
if [ "$1" = -c ]; then
  code=$2; shift 2
  exec {real} -c 'import platform, sys
sys.version_info = ({major}, {minor}, 0, "final", 0)
platform.python_version = lambda: "{major}.{minor}.0"
code = sys.argv.pop(1)
exec(code)' "$code" "$@"
fi
if [ "$1 $2" = "-m venv" ]; then
  echo "$(basename "$0") -m venv" >> {log}
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && cp "$0" "$3/bin/prunenet"
  exit 0
fi
if [ "$1 $2 $3" = "-m pip --version" ]; then exit {pip_status}; fi
if [ "$1 $2 $3" = "-m pip install" ]; then echo "PIP_USER=${{PIP_USER-unset}}" >> {log}.env; fi
if [ "$1" = fetch ]; then echo "PRUNENET_CACHE=${{PRUNENET_CACHE-unset}}" >> {log}.cache; fi
echo "$(basename "$0") $*" >> {log}
"""

# What setup.sh runs besides Python; nvidia-smi and curl stay out, as on a bare machine.
TOOLS = ("bash", "dirname", "uname", "rm", "mkdir", "cp", "cat", "basename", "timeout")


def write_python(path: Path, version: tuple[int, int], log: Path, pip: bool = True) -> None:
    """A stub interpreter of ``version`` at ``path``; ``pip=False`` is one without pip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB.format(major=version[0], minor=version[1], real=sys.executable, log=log,
                                pip_status=0 if pip else 1,
                                pip_note="" if pip else ", without pip"))
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path):
    """A checkout holding scripts/setup.sh, a PATH of TOOLS and stubs, and the stubs' log."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not on this machine")
        (bin_dir / tool).symlink_to(found)
    log = tmp_path / "calls.log"
    log.touch()

    def run(cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        full_env = {"PATH": str(bin_dir), "HOME": str(tmp_path),
                    "TORCH_CPU_INDEX": "http://127.0.0.1:9/nothing", **env}
        return subprocess.run(["bash", str(checkout / "scripts" / "setup.sh")], env=full_env,
                              capture_output=True, text=True, timeout=60, cwd=cwd)

    return checkout, bin_dir, log, run


def test_a_python3_older_than_3_10_alone_is_refused_naming_what_to_do(machine):
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 9), log)
    result = run()
    assert result.returncode == 2
    assert "needs Python 3.10 or newer; python3 is 3.9.0" in result.stderr
    assert "PYTHON=python3.11 bash scripts/demo.sh" in result.stderr
    assert log.read_text() == ""
    assert not (checkout / ".venv").exists()


def test_an_old_python3_gives_way_to_the_newest_python3_n(machine):
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 9), log)
    write_python(bin_dir / "python3.11", (3, 11), log)
    write_python(bin_dir / "python3.12", (3, 12), log)
    result = run()
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "python3.12 -m venv"
    assert any("install" in call and "torch==2.13.0" in call for call in calls)


def test_a_python3_new_enough_is_used_before_newer_ones(machine):
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 10), log)
    write_python(bin_dir / "python3.12", (3, 12), log)
    assert run().returncode == 0
    assert log.read_text().splitlines()[0] == "python3 -m venv"


def test_python_named_too_old_is_refused(machine):
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 12), log)
    write_python(bin_dir / "python3.8", (3, 8), log)
    result = run(PYTHON="python3.8")
    assert result.returncode == 2
    assert "python3.8 is 3.8.0" in result.stderr
    assert log.read_text() == ""


def test_no_python3_at_all_is_named_missing(machine):
    checkout, bin_dir, log, run = machine
    result = run()
    assert result.returncode == 2
    assert "python3 is missing" in result.stderr


@pytest.mark.parametrize("leftover", ["without pip", "of Python 3.9", "without an interpreter"])
def test_an_unusable_venv_is_made_again(machine, leftover):
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 11), log)
    venv_python = checkout / ".venv" / "bin" / "python"
    if leftover == "without an interpreter":
        venv_python.parent.mkdir(parents=True)
        venv_python.symlink_to(bin_dir / "python3.9")  # removed since
    else:
        write_python(venv_python, (3, 9) if "3.9" in leftover else (3, 11), log,
                     pip="pip" not in leftover)
    result = run()
    assert result.returncode == 0, result.stderr
    assert "making it again" in result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "python3 -m venv"
    assert calls[-1] == "prunenet fetch"


def test_a_working_venv_is_kept(machine):
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 12), log)
    write_python(checkout / ".venv" / "bin" / "python", (3, 10), log)
    (checkout / ".venv" / "bin" / "prunenet").symlink_to(checkout / ".venv" / "bin" / "python")
    result = run()
    assert result.returncode == 0, result.stderr
    assert "making it again" not in result.stderr
    assert "python3 -m venv" not in log.read_text()


def test_a_venv_of_another_python_than_the_one_named_is_made_again(machine):
    """PYTHON names the interpreter the set-up runs on: a working .venv of another Python
    version is made again with it (it had been kept, PYTHON ignored); one of the same version is
    kept; a PYTHON too old is refused, .venv untouched."""
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 10), log)
    write_python(bin_dir / "python3.12", (3, 12), log)
    write_python(bin_dir / "python3.9", (3, 9), log)
    write_python(checkout / ".venv" / "bin" / "python", (3, 10), log)
    (checkout / ".venv" / "bin" / "prunenet").symlink_to(checkout / ".venv" / "bin" / "python")
    result = run(PYTHON="python3.9")
    assert result.returncode == 2 and "python3.9 is 3.9.0" in result.stderr
    assert log.read_text() == "" and (checkout / ".venv" / "bin" / "python").is_file()
    result = run(PYTHON="python3")
    assert result.returncode == 0, result.stderr
    assert "making it again" not in result.stderr and "-m venv" not in log.read_text()
    log.write_text("")
    result = run(PYTHON="python3.12")
    assert result.returncode == 0, result.stderr
    assert ".venv is of Python 3.10, PYTHON=python3.12 is 3.12; making it again" in result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "python3.12 -m venv" and calls[-1] == "prunenet fetch"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU index is for Linux")
def torch_install_beside_a_cpu_index(machine, tmp_path) -> tuple[str, str]:
    """Run setup.sh with an answering CPU index; ``(the index, setup's torch install call)``."""
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 11), log)
    (tmp_path / "index" / "torch").mkdir(parents=True)
    (tmp_path / "index" / "torch" / "index.html").write_text("torch\n")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        functools.partial(http.server.SimpleHTTPRequestHandler, directory=tmp_path / "index"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cpu_index = f"http://127.0.0.1:{server.server_address[1]}"
        result = run(TORCH_CPU_INDEX=cpu_index)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    return cpu_index, next(call for call in log.read_text().splitlines() if "torch==" in call)


def test_the_cpu_index_is_offered_on_a_machine_without_curl(machine, tmp_path):
    cpu_index, torch_install = torch_install_beside_a_cpu_index(machine, tmp_path)
    assert f"--extra-index-url {cpu_index}" in torch_install


@pytest.mark.parametrize("status,listing,gpu", [
    (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", False),
    (0, "No devices were found", False),
    (0, "GPU 0: NVIDIA H200 (UUID: GPU-0)", True)])
def test_the_cpu_index_is_offered_unless_nvidia_smi_lists_a_gpu(machine, tmp_path, status,
                                                                 listing, gpu):
    """nvidia-smi installed without a working driver (or without a GPU) is a CPU machine."""
    bin_dir = machine[1]
    (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\necho '{listing}'\nexit {status}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    cpu_index, torch_install = torch_install_beside_a_cpu_index(machine, tmp_path)
    assert ("--extra-index-url" in torch_install) is not gpu


def test_without_an_answering_cpu_index_pip_uses_its_own(machine):
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 11), log)
    result = run()  # TORCH_CPU_INDEX: a closed port
    assert result.returncode == 0, result.stderr
    torch_install = next(call for call in log.read_text().splitlines() if "torch==" in call)
    assert "--extra-index-url" not in torch_install


def test_pip_installs_into_the_venv_when_its_configuration_asks_for_user_installs(machine):
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 11), log)
    result = run(PIP_USER="1")  # as `user = true` in pip.conf: refused inside a virtualenv
    assert result.returncode == 0, result.stderr
    assert set(Path(f"{log}.env").read_text().splitlines()) == {"PIP_USER=0"}


def test_a_relative_cache_folder_is_read_from_where_the_command_runs(machine, tmp_path):
    """setup.sh runs from the repository root; a relative $PRUNENET_CACHE still names a folder
    under the directory the user ran it from (it had been read from the repository root)."""
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 11), log)
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    for cache in ("models-cache", "/srv/models", "~/models"):  # prunenet expands the "~"
        assert run(cwd=elsewhere, PRUNENET_CACHE=cache).returncode == 0
    assert Path(f"{log}.cache").read_text().splitlines() == [
        f"PRUNENET_CACHE={elsewhere}/models-cache", "PRUNENET_CACHE=/srv/models",
        "PRUNENET_CACHE=~/models"]


def test_blanks_around_the_cache_folder_do_not_count(machine, tmp_path):
    """prunenet drops blanks around $PRUNENET_CACHE (blanks alone: the default cache), and so
    does setup.sh before it makes a relative one absolute: it had made " " the folder the
    command ran from, and " /srv/models" a folder " " there, beside what prunenet then read."""
    checkout, bin_dir, log, run = machine
    write_python(bin_dir / "python3", (3, 11), log)
    elsewhere = tmp_path / "my work"
    elsewhere.mkdir()
    for cache in (" ", " /srv/models\t", " models cache "):
        assert run(cwd=elsewhere, PRUNENET_CACHE=cache).returncode == 0
    assert Path(f"{log}.cache").read_text().splitlines() == [
        "PRUNENET_CACHE= ", "PRUNENET_CACHE= /srv/models\t",
        f"PRUNENET_CACHE={elsewhere}/models cache"]
