"""Stop signals as a request the program acts on at a safe point (the trainer and pre-tokenization share it).

``StopSignals(signals).install()`` replaces the handlers of ``signals`` (e.g. SIGTERM, SIGUSR1) with one that
only records the first signal (``requested``: its name, ``requested_at``: when); the program checks
``requested`` where stopping is safe (pre-tokenization: after the item in hand; the trainer: at an optimizer-step
boundary, model/training/lifecycle.py). A second signal calls ``on_second`` (default: exit at once with
``second_exit_code``): a user who presses Ctrl-C twice, or a launcher that insists, gets an immediate exit.
Signals within ``same_request_s`` (2 s) of the first are copies of the same request, not a second one: under
``srun torchrun ...`` SLURM signals every process of the step, workers included, and torchrun's agent forwards
the SIGTERM it got to the workers again a moment later.

Forked children (pre-tokenization workers) inherit the handler; in them it does nothing, so the signal that
SLURM sends to every process of a job step, or Ctrl-C to a terminal's process group, is left to their parent,
which stops them in order (a worker dying of it would fail the parent's next read). DataLoader workers install
their own SIGTERM handler (torch's: die unless the parent sent it), so the training loader calls
``ignore_signals`` in each worker (its ``worker_init_fn``, data/loader.py).

This module imports nothing of the project, so both sides may import it (data/ never imports model/training/).
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

# Exit statuses of a stop on request, the same for pre-tokenization and training (README: "On a cluster with
# time limits and preemption"): 75 is sysexits' EX_TEMPFAIL, "try again later".
EXIT_STOPPED = 75  # stopped at a safe point, everything so far written: re-run the same command (or requeue)
EXIT_STOPPED_AT_ONCE = 76  # a second signal (or no safe point in time): exited at once; the re-run still resumes


def parse_signals(spec: str) -> list[signal.Signals]:
    """``"SIGTERM,SIGUSR1"`` (names with or without ``SIG``, any case, or numbers) -> signals; ``"none"`` or
    ``""`` -> []. ValueError naming the bad entry. SIGKILL and SIGSTOP cannot be caught and are refused."""
    if spec.strip().lower() in ("", "none"):
        return []
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name = part.upper()
        try:
            sig = signal.Signals(int(name)) if name.isdigit() else signal.Signals[
                name if name.startswith("SIG") else "SIG" + name]
        except (KeyError, ValueError):
            raise ValueError(f"{part!r} is not a signal name (e.g. SIGTERM, SIGUSR1, SIGINT, or none)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{sig.name} cannot be caught; use e.g. SIGTERM or SIGUSR1")
        if sig not in out:
            out.append(sig)
    return out


class StopSignals:
    """Records the first of ``signals`` as a stop request; see the module docstring."""

    def __init__(self, signals: Sequence[signal.Signals], *, on_first: Callable[[str], None] | None = None,
                 on_second: Callable[[str], None] | None = None, second_exit_code: int = EXIT_STOPPED_AT_ONCE,
                 same_request_s: float = 2.0):
        self.signals = list(signals)
        self.on_first = on_first
        self.on_second = on_second
        self.second_exit_code = second_exit_code
        self.same_request_s = same_request_s
        self.requested: str | None = None
        self.requested_at: float | None = None  # time.monotonic() of the first signal
        self._pid = os.getpid()
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "StopSignals":
        """Installs the handlers (main thread only, as Python requires); returns self."""
        self._pid = os.getpid()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Puts the handlers found at ``install`` back (a run inside a longer-lived process, e.g. a test)."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker: its parent owns the stop
            return
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self.requested_at = name, time.monotonic()
            if self.on_first is not None:
                self.on_first(name)
            return
        if time.monotonic() - self.requested_at < self.same_request_s:
            logger.info("%s again within %gs of the first: the same stop request", name, self.same_request_s)
            return
        if self.on_second is not None:
            self.on_second(name)
            return
        logger.warning("%s after %s: exiting at once (exit status %d)", name, self.requested, self.second_exit_code)
        flush_logs()
        os._exit(self.second_exit_code)


def ignore_signals(signals: Sequence[signal.Signals]) -> None:
    """In a worker process: ignore ``signals``; the parent owns the stop and ends its workers in order."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def worker_ignoring(signals: Sequence[signal.Signals]) -> Callable[[int], None] | None:
    """A DataLoader ``worker_init_fn`` that ignores ``signals`` (None when there are none).

    Called in the parent. Workers that ignore SIGTERM would hang the parent at exit: multiprocessing's own
    exit hook ends daemonic children (DataLoader workers are daemonic) with SIGTERM and then joins them, so a
    worker still alive then (a run that stopped on an error mid-epoch) would be waited for forever. So the
    first call also registers an exit hook, run before multiprocessing's (atexit runs last-registered first),
    that ends the daemonic children still alive with SIGKILL: what multiprocessing would do, with a signal
    they cannot ignore."""
    if not signals:
        return None
    global _kill_hook_registered
    if not _kill_hook_registered:
        atexit.register(_kill_daemonic_children)
        _kill_hook_registered = True
    return functools.partial(_ignore_in_worker, tuple(signals))


_kill_hook_registered = False


def _kill_daemonic_children() -> None:
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(timeout=5)


def _ignore_in_worker(signals: tuple, worker_id: int) -> None:
    ignore_signals(signals)


def flush_logs() -> None:
    """Flushes every handler of the root logger and the standard streams (before an ``os._exit``)."""
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001 - a broken log sink must not stop the exit
            pass
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (OSError, ValueError):
            pass
