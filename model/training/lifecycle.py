"""The run's lifecycle on a cluster: stop signals, a time limit, and a watchdog for a hung rank.

The training loop calls three things: ``should_stop(step)`` at every optimizer-step boundary (collective),
``progress()`` when a step finished, and ``phase(name)`` / ``watch(name, fn)`` to say what it is doing.

Stop on request (``--exit_signals``, default SIGTERM,SIGUSR1; ``none`` turns it off). The handler only
records the signal (data/stop_signals.py; DataLoader workers, forked, ignore it and leave it to their parent).
At the next step boundary the ranks agree with one all-reduce (MAX) of two integers: the signal any rank got,
and whether rank 0's clock says ``--exit_duration_in_mins`` is up. So a signal to ONE rank (srun signals every
task; torchrun's agent forwards SIGTERM to every worker; ``kill -USR1`` of one worker) stops all of them at
the same step. They write the normal atomic checkpoint ``epoch{E}-iter{I}`` (none when the step was just
saved), log "stopped by SIGTERM at step N; checkpoint ...", rank 0 writes ``{output_dir}/requeue.json``, and
every rank exits with ``EXIT_STOPPED`` (75, sysexits' EX_TEMPFAIL: "try again later"). The re-run of the
same command resumes from that checkpoint exactly (same batches, RNG and optimizer state: bitwise losses).

A second signal, or no step boundary within ``--exit_grace_s`` of the first (a long evaluation, sampling
round, first index build or checkpoint save in the way), exits at once with ``EXIT_STOPPED_NO_CHECKPOINT``
(76) and no new checkpoint: the newest complete one stays valid (saves are atomic), the re-run resumes there.
A signal that arrives inside such a phase is not lost: the phase finishes (a checkpoint save is completed,
never cut) and the next boundary stops; the grace timer bounds how long that may take.

Time limit (``--exit_duration_in_mins M``, Megatron's name): M minutes after this lifecycle started (right
after the process group, so model loading and index builds count, as they count against a job's limit),
measured on rank 0's clock and shared through the same all-reduce; the stop is the same as for a signal.

Hung rank (``--hang_timeout S``, default 1800 s, 0 off): a thread watches for progress (a step completed, a
checkpoint, an evaluation or a sampling round finished). After S seconds without any, it writes the Python
stacks of every thread (faulthandler) to ``{output_dir}/hang/rank{r}-step{N}.txt`` (N: the step in hand),
logs the step and phase (data, forward/backward, optimizer, checkpoint, evaluation, sampling, stop check),
and exits with ``EXIT_HUNG`` (77); the launcher then ends the job (torchrun at once, srun with
``--kill-on-bad-exit=1``) instead of waiting for the collective timeout. If a thread holds the GIL so that the
watchdog cannot run, faulthandler's own C thread dumps all stacks to stderr 60 s later and exits. With CUDA,
PyTorch's NCCL flight recorder is turned on (only where the user has not set its variables) and dumps into the
same folder; the watchdog also writes its trace there.

Exit statuses (also in the README): 0 done (or --max_steps reached), 1 an error, 2 bad launch environment,
75 stopped with a checkpoint, 76 stopped at once without a new one, 77 hung.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from data.files import write_json_atomic
from data.stop_signals import EXIT_STOPPED, EXIT_STOPPED_AT_ONCE, StopSignals, flush_logs, parse_signals

logger = logging.getLogger(__name__)

# EXIT_STOPPED (75): stopped on request or at the time limit, checkpoint written: requeue / re-run
EXIT_STOPPED_NO_CHECKPOINT = EXIT_STOPPED_AT_ONCE  # 76: second signal or grace ran out; the last checkpoint is valid
EXIT_HUNG = 77  # no progress for --hang_timeout: stacks in {output_dir}/hang/
REQUEUE_FILE = "requeue.json"
HANG_DIR = "hang"
GIL_BACKSTOP_S = 60.0  # faulthandler's C thread fires this much after --hang_timeout if Python cannot run

# PyTorch's NCCL flight recorder: a ring buffer of recent collectives, dumped on a collective timeout
NCCL_TRACE_BUFFER = "2000"


@dataclass(frozen=True)
class Stop:
    """Why the loop stops early, and the process's exit status once the checkpoint is written."""
    reason: str  # "SIGTERM", "--exit_duration_in_mins 30", "--max_steps 8"
    exit_code: int


def flag_problems(exit_signals: str, exit_grace_s: float, exit_duration_in_mins: float | None,
                  hang_timeout: float) -> list[str]:
    bad = []
    try:
        parse_signals(exit_signals)
    except ValueError as e:
        bad.append(f"--exit_signals: {e}")
    if exit_grace_s <= 0:
        bad.append(f"--exit_grace_s must be > 0 (got {exit_grace_s})")
    if exit_duration_in_mins is not None and exit_duration_in_mins <= 0:
        bad.append(f"--exit_duration_in_mins must be > 0 (got {exit_duration_in_mins})")
    if hang_timeout < 0:
        bad.append(f"--hang_timeout must be >= 0 (0: off; got {hang_timeout})")
    return bad


def enable_nccl_flight_recorder(output_dir: str | Path) -> list[str]:
    """With CUDA, turns on PyTorch's NCCL flight recorder dumps into ``{output_dir}/hang/`` for the variables the
    user has not set; call before the process group exists. Returns the variables set."""
    if not torch.cuda.is_available():
        return []
    want = {"TORCH_NCCL_TRACE_BUFFER_SIZE": NCCL_TRACE_BUFFER, "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(Path(output_dir).resolve() / HANG_DIR / "nccl_trace_rank_")}
    set_now = [k for k in want if k not in os.environ]
    for k in set_now:
        os.environ[k] = want[k]
    if set_now:
        (Path(output_dir) / HANG_DIR).mkdir(parents=True, exist_ok=True)
    return set_now


class Lifecycle:
    """Signals, time limit and watchdog of one rank; see the module docstring."""

    def __init__(self, *, output_dir: str | Path, rank: int, world: int, device: torch.device,
                 exit_signals: str = "SIGTERM,SIGUSR1", exit_grace_s: float = 120.0,
                 exit_duration_in_mins: float | None = None, hang_timeout: float = 1800.0,
                 max_steps: int | None = None):
        self.out = Path(output_dir)
        self.rank, self.world, self.device = rank, world, device
        self.exit_grace_s = exit_grace_s
        self.duration_s = None if exit_duration_in_mins is None else exit_duration_in_mins * 60.0
        self.duration_flag = exit_duration_in_mins
        self.hang_timeout = hang_timeout
        self.max_steps = max_steps
        self.signals = StopSignals(parse_signals(exit_signals), on_first=self._on_first,
                                   on_second=lambda name: self._exit_now(f"a second signal ({name})"))
        self.t0 = time.monotonic()
        self.step_in_hand = 0  # the optimizer step being worked on (1-based, as in metrics.jsonl)
        self.current_phase = "setup"
        self._last_progress = time.monotonic()
        self._armed = False  # the watchdog starts with the first step boundary (setup has its own timeouts)
        self._agreed = False
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_args(cls, a, rank: int, world: int, device: torch.device) -> "Lifecycle":
        return cls(output_dir=a.output_dir, rank=rank, world=world, device=device, exit_signals=a.exit_signals,
                   exit_grace_s=a.exit_grace_s, exit_duration_in_mins=a.exit_duration_in_mins,
                   hang_timeout=a.hang_timeout, max_steps=a.max_steps)

    # -------------------------------------------------------------------------------------------------------
    # start and end

    def start(self) -> "Lifecycle":
        """Installs the signal handlers (main thread), removes a stale requeue file (rank 0) and starts the
        watchdog thread."""
        self.signals.install()
        if self.rank == 0:
            (self.out / REQUEUE_FILE).unlink(missing_ok=True)  # a stale one would requeue a run that failed
        if self.hang_timeout > 0 or self.signals.signals:
            self._thread = threading.Thread(target=self._watch, name="lifecycle-watchdog", daemon=True)
            self._thread.start()
        if self.signals.signals:
            logger.info("stop signals %s: checkpoint at the next step boundary and exit %d (a second signal, or "
                        "no boundary within --exit_grace_s %gs: exit %d at once)",
                        ",".join(s.name for s in self.signals.signals), EXIT_STOPPED, self.exit_grace_s,
                        EXIT_STOPPED_NO_CHECKPOINT)
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._armed and self.hang_timeout > 0:
            faulthandler.cancel_dump_traceback_later()
        self.signals.restore()

    def __enter__(self) -> "Lifecycle":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------------------
    # what the loop calls

    def phase(self, name: str) -> None:
        """Marks what this rank is doing now (named in a hang report)."""
        self.current_phase = name

    def progress(self) -> None:
        """A step, checkpoint, evaluation or sampling round finished: the watchdog starts counting again."""
        self._last_progress = time.monotonic()
        if self._armed and self.hang_timeout > 0:  # C-level backstop, for a thread that holds the GIL
            faulthandler.dump_traceback_later(self.hang_timeout + GIL_BACKSTOP_S, exit=True, file=sys.__stderr__)

    def watch(self, name: str, fn: Callable) -> Callable:
        """``fn`` run as phase ``name``; its end counts as progress (checkpoint saves, evaluation, sampling)."""
        def watched(*args, **kw):
            previous, self.current_phase = self.current_phase, name
            try:
                return fn(*args, **kw)
            finally:
                self.current_phase = previous
                self.progress()
        return watched

    def should_stop(self, step: int) -> Stop | None:
        """At the boundary before optimizer step ``step + 1``: whether to stop, the same answer on every rank
        (one all-reduce of two integers). ``step``: optimizer steps done so far."""
        if not self._armed:
            self._armed = True
            self.progress()
        self.step_in_hand = step + 1
        self.phase("stop check")
        sig = int(_signum(self.signals.requested))
        time_up = int(self.rank == 0 and self.duration_s is not None and time.monotonic() - self.t0 >= self.duration_s)
        if self.world > 1:
            t = torch.tensor([sig, time_up], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            sig, time_up = t.tolist()
        self.phase("data")
        if sig:
            self._agreed = True
            return Stop(_signame(sig), EXIT_STOPPED)
        if time_up:
            self._agreed = True
            return Stop(f"--exit_duration_in_mins {self.duration_flag:g}", EXIT_STOPPED)
        if self.max_steps is not None and step >= self.max_steps:
            return Stop(f"--max_steps {self.max_steps}", 0)
        return None

    def stopped(self, stop: Stop, step: int, checkpoint: Path | None) -> int:
        """Logs the stop, writes the requeue file (rank 0) before any rank exits; returns the exit status."""
        self.phase("stopping")
        if stop.exit_code == 0:
            logger.info("stopped at %s (step %d)", stop.reason, step)
            return 0
        logger.warning("stopped by %s at step %d; checkpoint %s; exit status %d: re-run the same command (or "
                       "requeue the job) to continue from it", stop.reason, step, checkpoint, stop.exit_code)
        if self.rank == 0:
            self._write_requeue(stop.reason, step, checkpoint, stop.exit_code)
        if self.world > 1:  # no rank leaves before the file is there (torchrun kills the rest at the first exit)
            dist.barrier()
        return stop.exit_code

    # -------------------------------------------------------------------------------------------------------
    # inside

    def _on_first(self, name: str) -> None:
        logger.warning("%s received during %s of step %d: stopping at the next optimizer-step boundary with a "
                       "checkpoint (a second signal exits at once)", name, self.current_phase, self.step_in_hand)

    def _write_requeue(self, reason: str, step: int, checkpoint: Path | None, code: int) -> None:
        try:
            write_json_atomic(self.out / REQUEUE_FILE, {
                "reason": reason, "step": step, "checkpoint": None if checkpoint is None else str(checkpoint),
                "exit_status": code, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError as e:
            logger.warning("cannot write %s: %s", self.out / REQUEUE_FILE, e)

    def _latest(self) -> Path | None:
        from model.training.checkpointing import latest_checkpoint

        try:
            return latest_checkpoint(self.out)
        except OSError:
            return None

    def _exit_now(self, why: str) -> None:
        last = self._latest()
        logger.error("%s during %s of step %d: exiting at once without a new checkpoint (exit status %d); the "
                     "newest complete checkpoint stays valid: %s", why, self.current_phase, self.step_in_hand,
                     EXIT_STOPPED_NO_CHECKPOINT, last if last is not None else "none")
        self._write_requeue(f"{self.signals.requested} ({why})", self.step_in_hand - 1, last,
                            EXIT_STOPPED_NO_CHECKPOINT)
        flush_logs()
        os._exit(EXIT_STOPPED_NO_CHECKPOINT)

    def _watch(self) -> None:
        poll = max(0.05, min(1.0, self.hang_timeout / 20 if self.hang_timeout > 0 else 1.0, self.exit_grace_s / 20))
        while not self._closed.wait(poll):
            now = time.monotonic()
            req = self.signals.requested_at
            if req is not None and not self._agreed and now - req > self.exit_grace_s:
                self._exit_now(f"no optimizer-step boundary within --exit_grace_s {self.exit_grace_s:g} of "
                               f"{self.signals.requested}")
            if self._armed and self.hang_timeout > 0 and now - self._last_progress > self.hang_timeout:
                self._hung(now - self._last_progress)

    def _hung(self, idle: float) -> None:
        step, phase = self.step_in_hand, self.current_phase
        folder = self.out / HANG_DIR
        path = folder / f"rank{self.rank}-step{step}.txt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"rank {self.rank} of {self.world}, pid {os.getpid()}: no progress for {idle:.0f} s "
                        f"(--hang_timeout {self.hang_timeout:g}) in step {step}, phase {phase}\n"
                        f"Python stacks of all threads, most recent call first:\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            path = None
            logger.error("cannot write the hang report into %s (%s); stacks follow on stderr", folder, e)
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        self._dump_flight_recorder(folder)
        logger.error("rank %d hung: no progress for %.0f s (--hang_timeout %g) in step %d, phase %s; stacks of all "
                     "threads in %s; exiting (status %d) so the launcher ends the job; the re-run resumes from %s",
                     self.rank, idle, self.hang_timeout, step, phase, path, EXIT_HUNG,
                     self._latest() or "the start (no checkpoint yet)")
        flush_logs()
        os._exit(EXIT_HUNG)

    def _dump_flight_recorder(self, folder: Path) -> None:
        """With NCCL, the flight recorder's recent collectives as JSON next to the stacks (PyTorch >= 2.4)."""
        if self.device.type != "cuda" or not dist.is_initialized():
            return
        try:
            import torch._C._distributed_c10d as c10d

            dump = getattr(c10d, "_dump_nccl_trace_json", None) or getattr(c10d, "_dump_fr_trace_json", None)
            if dump is not None:
                (folder / f"rank{self.rank}-step{self.step_in_hand}-nccl.json").write_text(dump(True, False))
        except Exception as e:  # noqa: BLE001 - a missing recorder must not stop the hang report
            logger.warning("no NCCL flight recorder dump: %s", e)


def _signum(name: str | None) -> int:
    return 0 if name is None else int(signal.Signals[name])


def _signame(num: int) -> str:
    return signal.Signals(num).name
