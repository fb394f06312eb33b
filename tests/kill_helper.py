"""Kill -9 a stage script at a chosen point of its output, for the exactly-once tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Sequence


def kill_at_lines(cmd: list[str], cwd: Path | None, watched: Path, wait_lines: Sequence[int],
                  timeout: float = 120) -> list[int]:
    """Runs ``cmd`` once per entry of ``wait_lines`` and SIGKILLs it as soon as ``watched`` holds that many lines
    (or when it exits or ``timeout`` passes). SIGKILL: no cleanup in the process; its workers must die with it
    (else a lock stays). Returns the line counts of ``watched`` right after each kill."""
    killed_at = []
    for lines in wait_lines:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and p.poll() is None:
                if watched.exists() and watched.read_bytes().count(b"\n") >= lines:
                    break
                time.sleep(0.005)
        finally:
            p.kill()
            p.wait(timeout=30)
        killed_at.append(watched.read_bytes().count(b"\n"))
    return killed_at
