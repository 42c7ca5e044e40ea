"""Run a command as ``subprocess.run`` does, but when it outlives its timeout, show where it hangs.

A run that hangs in CI (a rank waiting in a collective, a data worker stuck) otherwise leaves only
"timed out after N seconds". Here the command runs in its own session with Python's faulthandler on
(inherited by every rank and forked data worker); on timeout every process of the session gets
SIGABRT, whose faulthandler dump (every thread's Python stack) lands in the stderr the failure
shows, then SIGKILL. :func:`run` raises :class:`Hung` (a ``subprocess.TimeoutExpired``) with that
output in its message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

__all__ = ["Hung", "run"]


class Hung(subprocess.TimeoutExpired):
    """``TimeoutExpired`` whose message ends with the command's stderr (the stacks) and stdout."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n--- stdout (last 3000 chars) ---\n{(self.stdout or '')[-3000:]}"
            f"\n--- stderr (last 30000 chars) ---\n{(self.stderr or '')[-30000:]}"
        )


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, **kwargs: Any):
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, ...)``, with the stacks
    of every process of the command in the ``TimeoutExpired`` it raises."""
    env = (os.environ if env is None else env) | {"PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGABRT)
            time.sleep(3)  # the dumps are written from the signal handler: let them reach the pipes
            _signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise Hung(cmd, timeout, output=out, stderr=f"{err}\n{_dump_note()}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _dump_note() -> str:
    return "(timed out: every process of the run was sent SIGABRT; the stacks above are theirs)"
