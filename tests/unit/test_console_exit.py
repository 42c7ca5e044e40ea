"""The console script ends the process through the interpreter's own exit: the command's exit code,
the atexit handlers, non-daemon threads and buffered output all happen as Python does them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("joined")
threading.Thread(target=late).start()  # non-daemon: the exit waits for it, as Python's own does
sys.stdout.write("buffered, no newline")
from mmpretrain.cli import console
console(["sweep-summary", str(out / "no-such-sweep")])
"""


def test_console_exit_keeps_exit_code_atexit_handlers_threads_and_output(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr  # sweep-summary's "not found" code
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "joined"
    assert "buffered, no newline" in proc.stdout and "no-such-sweep" in proc.stderr


def test_the_console_script_is_the_cli_entry():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mmpretrain"] == "mmpretrain.cli:console"
