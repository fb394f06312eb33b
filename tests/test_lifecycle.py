"""Runs that survive their cluster (model/training/lifecycle.py): real signals to torchrun and its workers on
CPU (gloo, 2 ranks), a time limit, a frozen worker. No mocks: signals are sent with os.kill, either by this test
(to the launcher, or SIGSTOP to a worker, once a seeded step is in metrics.jsonl) or, for moments that must land
inside a phase, by the worker itself from a hook at the start of a checkpoint save or an evaluation.

Every interrupted run is re-run with the same command and must give bitwise the losses of one uninterrupted
run (the module's ``reference``; dropout on, so RNG state matters).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dist_helper import REPO, make_learnable_data, run, torchrun
from model.training import checkpointing as ck
from model.training.lifecycle import EXIT_HUNG, EXIT_STOPPED, REQUEUE_FILE
from model.make_tiny_model import make_tiny_model

TIMEOUT = 240
SEED = 22
RNG = random.Random(SEED)
STEPS = 8  # 32 items, global batch 4 (2 ranks x 1 x accum 2)
FLAGS = ("--batch_size", "1", "--accum_iter", "2", "--dropout", "0.1", "--save_iteration_interval", "3",
         "--eval_every", "2", "--eval_items", "8", "--no_export_hf", "--max_seq_len", "64", "--ckpt_max_keep", "0")

# Runs finetune_solver's main in a torchrun worker with a hook that sends a real signal at a chosen moment:
# STOP_AT=event:n:rank:target:SIG -- at the start of the n-th checkpoint save ("save") or evaluation ("eval")
# of that rank, send SIG to the launcher (torchrun's agent, the worker's parent) or to the worker itself.
# STEP_SLEEP=s sleeps s seconds in every optimizer step (a run long enough for a time limit to land in it).
HOOKED = """
import os, signal, sys, time
import finetune_solver as fs
from model.training import checkpointing as ck, evaluation
spec = os.environ.get("STOP_AT")
if spec:
    event, n, rank, target, sig = spec.split(":")
    seen = [0]
    def fire():
        seen[0] += 1
        if seen[0] == int(n) and os.environ["RANK"] == rank:
            os.kill(os.getppid() if target == "launcher" else os.getpid(), getattr(signal, sig))
    if event == "save":
        save = ck.dcp_save
        def hooked_save(*a, **k):
            fire()
            return save(*a, **k)
        ck.dcp_save = hooked_save
    else:
        evaluate = evaluation.Evaluator.run
        def hooked_eval(self, *a, **k):
            fire()
            return evaluate(self, *a, **k)
        evaluation.Evaluator.run = hooked_eval
if os.environ.get("STEP_SLEEP"):
    step = fs.train_step
    def slow_step(*a, **k):
        time.sleep(float(os.environ["STEP_SLEEP"]))
        return step(*a, **k)
    fs.train_step = slow_step
sys.exit(fs.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def assets(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle_assets")
    (root / "hooked.py").write_text(HOOKED)
    return {"model": make_tiny_model(tiny_bundle, root / "model", seed=0),
            "data": make_learnable_data(root / "data", n_items=32), "hooked": root / "hooked.py"}


def flags(assets, out: Path, *extra: str) -> list[str]:
    return ["--init_from", str(assets["model"]), "--data_config", str(assets["data"]), "--val_data_config",
            str(assets["data"]), "--output_dir", str(out), "--precision", "fp32", "--num_workers", "0",
            "--log_every", "1", "--lr", "1e-2", "--warmup_epochs", "0.1", *FLAGS, *extra]


def command(assets, out: Path, *extra: str, hooked: bool = False, launcher: tuple[str, ...] = ()) -> list[str]:
    script = str(assets["hooked"]) if hooked else "finetune_solver.py"
    cmd = torchrun(2, [script, *flags(assets, out, *extra)])
    return cmd[:3] + list(launcher) + cmd[3:]


ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out[-6000:]}") from None
    return out


def wait_for_step(out: Path, step: int, p: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if step in metrics(out):
            return
        assert p.poll() is None, finish(p)[-4000:]
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def workers(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (children of the launcher carrying RANK)."""
    found = {}
    for pid in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if rank:
            found[int(rank[0])] = int(pid)
    return found


def metrics(out: Path) -> dict[int, dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def losses(out: Path) -> dict[int, tuple[float, float]]:
    return {s: (r["loss"], r["grad_norm"]) for s, r in metrics(out).items()}


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One uninterrupted run, shared by every test here."""
    out = tmp_path_factory.mktemp("reference")
    p = start(command(assets, out))
    log = finish(p)
    assert p.returncode == 0, log[-4000:]
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    return out


def stopped_step(out: Path, sig: str) -> int:
    """The step at which every rank logged its stop (all the same), checked against the checkpoint."""
    steps = set()
    for r in range(2):  # rank logs are appended to by every run of the output dir: the newest line counts
        lines = [ln for ln in (out / f"rank-{r}.log").read_text().splitlines() if f"stopped by {sig} at step" in ln]
        assert lines, (r, sig)
        steps.add(int(lines[-1].split(" at step ")[1].split(";")[0]))
    assert len(steps) == 1, steps
    step = steps.pop()
    info = json.loads((out / REQUEUE_FILE).read_text())
    assert (info["exit_status"], info["step"], info["reason"]) == (EXIT_STOPPED, step, sig)
    last = ck.latest_checkpoint(out)
    if step == 0:  # stopped before the first step: nothing to save
        assert info["checkpoint"] is None and last is None
        return step
    assert last is not None and Path(info["checkpoint"]) == last
    assert ck.read_train_state(last)["global_step"] == step  # complete, and at the stop step
    ck.verify_checkpoint(last)
    return step


def rerun_matches(assets, out: Path, reference: Path) -> None:
    p = start(command(assets, out))
    log = finish(p)
    assert p.returncode == 0, log[-4000:]
    assert not (out / REQUEUE_FILE).exists()  # a finished run leaves no request to requeue
    assert losses(out) == losses(reference)  # bitwise, every step


def stop_inside(assets, out: Path, event: str, n: int, rank: int, target: str, sig: str) -> int:
    """A run whose ``rank`` sends ``sig`` to ``target`` at the start of its n-th save or evaluation; returns
    the step all ranks stopped at."""
    p = start(command(assets, out, hooked=True), env={"STOP_AT": f"{event}:{n}:{rank}:{target}:{sig}"})
    log = finish(p)
    assert p.returncode != 0, log[-4000:]
    if target == "self":  # torchrun names the workers' status (after SIGTERM it reports its own signal)
        assert re.search(rf"exitcode\s*:\s*{EXIT_STOPPED}", log), log[-3000:]
    phase = {"save": "checkpoint", "eval": "evaluation"}[event]
    assert f"{sig} received during {phase}" in (out / f"rank-{rank}.log").read_text()
    return stopped_step(out, sig)


@pytest.mark.slow
def test_stop_signals_at_seeded_moments_stop_all_ranks_at_one_step_with_a_checkpoint_and_resume_bitwise(
        assets, reference, tmp_path):
    """Three stops of one run, each resumed by the same command, then a run to the end: the losses of all
    steps are bitwise those of the uninterrupted reference."""
    # 1. SIGTERM to torchrun's agent while rank 0 saves the step-3 checkpoint: the agent forwards it to both
    #    workers; the save completes and is the stop checkpoint (no second save)
    s1 = stop_inside(assets, tmp_path, "save", 1, 0, "launcher", "SIGTERM")
    assert s1 == 3
    # 2. SIGUSR1 to one worker (rank 1) at the start of an evaluation of the resumed run (seeded: which one)
    n = RNG.randint(1, 2)
    s2 = stop_inside(assets, tmp_path, "eval", n, 1, "self", "SIGUSR1")
    assert s2 == 2 * (s1 // 2 + n), (s1, n, s2)  # evaluations run after even steps
    # 3. SIGTERM to the launcher from outside once a seeded step is in metrics.jsonl (any moment of a step)
    k = RNG.randint(s2 + 1, STEPS - 1)
    p = start(command(assets, tmp_path))
    wait_for_step(tmp_path, k, p)
    os.kill(p.pid, signal.SIGTERM)
    log = finish(p)
    if p.returncode == 0:  # the signal landed in the last step: the run finished, nothing left to requeue
        assert k == STEPS - 1 and sorted(metrics(tmp_path)) == list(range(1, STEPS + 1)), log[-3000:]
    else:
        assert k <= stopped_step(tmp_path, "SIGTERM") < STEPS
    rerun_matches(assets, tmp_path, reference)


@pytest.mark.slow
def test_a_frozen_worker_ends_the_job_within_hang_timeout_and_a_time_limit_stops_the_rerun(
        assets, reference, tmp_path):
    """SIGSTOP of one worker: the live rank writes its stacks and exits, torchrun ends the job; the re-run,
    under --exit_duration_in_mins 0.3, stops on rank 0's clock; the third run finishes bitwise."""
    hang, grace = 6, 5
    p = start(command(assets, tmp_path, "--hang_timeout", str(hang), launcher=("--shutdown_timeout", str(grace))))
    k = RNG.randint(1, 2)  # before the first checkpoint (step 3)
    wait_for_step(tmp_path, k, p)
    victim = workers(p.pid)[1]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    try:
        log = finish(p, timeout=hang + grace + 60)
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    took = time.monotonic() - t0
    assert p.returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_HUNG}", log), log[-4000:]
    assert took < hang + grace + 30, took  # never the 30-minute collective timeout
    files = sorted((tmp_path / "hang").glob("rank*-step*.txt"))
    assert [f.name.split("-")[0] for f in files] == ["rank0"], files  # the frozen rank writes nothing
    text = files[0].read_text()
    assert "no progress for" in text and "phase" in text
    assert 'finetune_solver.py", line' in text and "in train" in text, text  # where the main thread waits
    rank0 = (tmp_path / "rank-0.log").read_text()
    assert "hung: no progress for" in rank0 and str(files[0]) in rank0

    # 0.3 min = 18 s from start-up; no checkpoint was complete, so 8 steps of 4 s each are left: the limit lands
    # in training (at step 0 if start-up alone took 18 s: a stop without a checkpoint)
    assert ck.latest_checkpoint(tmp_path) is None
    p = start(command(assets, tmp_path, "--exit_duration_in_mins", "0.3", hooked=True), env={"STEP_SLEEP": "4"})
    log = finish(p)
    assert p.returncode != 0, log[-4000:]
    stopped_step(tmp_path, "--exit_duration_in_mins 0.3")
    rerun_matches(assets, tmp_path, reference)


# ------------------------------------------------------------------------------------------------------------
# fast checks: the pieces alone, each in a process of its own where it ends the process


def _py(code: str, out: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", code], timeout=timeout, env={**ENV}, check=False, cwd=out)


LIFECYCLE = """
import logging, os, signal, sys, time, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from model.training.lifecycle import Lifecycle
lc = Lifecycle(output_dir=".", rank=0, world=1, device=torch.device("cpu"), exit_grace_s={grace},
               hang_timeout={hang}).start()
def stuck_in_a_collective():
    time.sleep(30)
"""


def test_no_step_boundary_within_exit_grace_s_exits_at_once_without_a_checkpoint(tmp_path):
    t0 = time.monotonic()
    r = _py(LIFECYCLE.format(grace=0.5, hang=0) + "os.kill(os.getpid(), signal.SIGTERM)\nstuck_in_a_collective()",
            tmp_path)
    assert r.returncode == 76, r.stdout[-3000:]
    assert time.monotonic() - t0 < 25
    assert "no optimizer-step boundary within --exit_grace_s 0.5 of SIGTERM" in r.stdout
    assert "newest complete checkpoint stays valid: none" in r.stdout
    assert json.loads((tmp_path / REQUEUE_FILE).read_text())["exit_status"] == 76


def test_a_second_signal_exits_at_once_but_a_copy_of_the_first_does_not(tmp_path):
    code = LIFECYCLE.format(grace=60, hang=0) + """
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR1)  # within 2 s: the same request (srun + torchrun's forwarded copy)
time.sleep(2.5)
print("still running after the copy", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("not reached", flush=True)
"""
    r = _py(code, tmp_path)
    assert r.returncode == 76, r.stdout[-3000:]
    assert "still running after the copy" in r.stdout and "not reached" not in r.stdout
    assert "a second signal (SIGTERM)" in r.stdout


def test_watchdog_writes_the_stacks_of_a_rank_without_progress_and_exits_77(tmp_path):
    code = (LIFECYCLE.format(grace=60, hang=1)
            + "lc.should_stop(4)\nlc.phase('forward/backward')\nstuck_in_a_collective()")
    r = _py(code, tmp_path)
    assert r.returncode == EXIT_HUNG, r.stdout[-3000:]
    text = (tmp_path / "hang" / "rank0-step5.txt").read_text()
    assert "in step 5, phase forward/backward" in text
    assert "in stuck_in_a_collective" in text and "lifecycle-watchdog" not in text.split("\n")[0]
    assert "rank 0 hung: no progress for" in r.stdout


def test_loader_workers_ignore_the_stop_signal_and_leave_it_to_their_parent(assets):
    """A real DataLoader worker of the training data gets SIGTERM, as srun sends it to every process of the
    step: it goes on (torch's own worker handler would let it die), and the request is the parent's alone."""
    from data.loader import build_train_data
    from data.stop_signals import StopSignals

    def worker_pid() -> int:
        kids = {int(c) for t in Path("/proc/self/task").iterdir() for c in (t / "children").read_text().split()}
        assert len(kids - before) == 1, kids - before
        return (kids - before).pop()

    before = {int(c) for t in Path("/proc/self/task").iterdir() for c in (t / "children").read_text().split()}

    def batches(**kw):
        data = build_train_data(assets["data"], max_seq_len=64, micro_batch_size=2, accum_iter=1, world_size=1,
                                rank=0, seed=0, num_workers=1, pad_id=0, **kw)
        data.sampler.set_epoch(0)
        return iter(data.loader)

    with StopSignals([signal.SIGTERM]) as stop:
        it = batches(worker_ignores=[signal.SIGTERM])
        got = [next(it)["input_ids"]]
        os.kill(worker_pid(), signal.SIGTERM)
        got += [b["input_ids"] for b in it]
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
    assert len(got) == 16
    with StopSignals([signal.SIGTERM]):  # without: the worker dies of it and the loader fails
        it = batches()
        next(it)
        os.kill(worker_pid(), signal.SIGTERM)
        # the loader notices the dead worker either through torch's check ("exited unexpectedly") or as the
        # worker's queue closing under it (EOFError, ConnectionResetError), depending on when the signal lands
        with pytest.raises((RuntimeError, EOFError, ConnectionError)):
            list(it)


def test_exit_signals_flag_parses_names_and_none_and_refuses_the_uncatchable():
    from data.stop_signals import parse_signals

    assert parse_signals("SIGTERM,usr1, 2") == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    assert parse_signals("none") == []
    for bad in ("SIGKILL", "SIGFOO"):
        with pytest.raises(ValueError, match=bad):
            parse_signals(bad)


def test_new_flags_have_help_and_clear_errors(assets, capsys):
    import finetune_solver

    text = finetune_solver.build_parser().format_help()
    for f in ("--exit_signals", "--exit_grace_s", "--exit_duration_in_mins", "--hang_timeout"):
        assert f in text, f
    for argv, msg in ((["--exit_signals", "SIGKILL"], "--exit_signals: SIGKILL cannot be caught"),
                      (["--exit_duration_in_mins", "0"], "--exit_duration_in_mins must be > 0"),
                      (["--hang_timeout", "-1"], "--hang_timeout must be >= 0")):
        with pytest.raises(SystemExit):
            finetune_solver.parse_args(["--data_config", str(assets["data"]), *argv])
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("script", ["7B.sh", "34B.sh"])
def test_exps_scripts_take_exit_duration_in_mins_from_the_environment(script, tmp_path):
    r = run(["bash", f"exps/{script}"], timeout=30, env={"DRY_RUN": "1", "DATA_CONFIG": "d.yaml",
                                                          "EXIT_DURATION_IN_MINS": "1410"})
    argv = r.stdout.strip().splitlines()[-1].split()
    assert argv[argv.index("--exit_duration_in_mins") + 1] == "1410"


def test_exps_script_survives_a_step_wide_signal_and_passes_the_trainers_status_on(tmp_path):
    """srun signals every process of the step: the shell must wait for the trainer and tee keep logging."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\ntrap 'sleep 1; echo checkpoint written; exit 75' TERM\necho started\n"
                    "while true; do sleep 0.1; done\n")
    fake.chmod(0o755)
    env = {**os.environ, "DATA_CONFIG": "d.yaml", "OUTPUT_DIR": str(tmp_path / "o"), "PYTHON": str(fake)}
    p = subprocess.Popen(["bash", "exps/7B.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = tmp_path / "o" / "output.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and "started" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)  # every process of the group, as slurmstepd does
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 75, out
    assert "checkpoint written" in log.read_text()  # tee outlived the signal


def test_a_process_that_exits_with_signal_ignoring_loader_workers_alive_does_not_hang(assets, tmp_path):
    """A run that stops on an error mid-epoch leaves its loader worker running; at exit multiprocessing ends
    daemonic children with SIGTERM and joins them, which a worker ignoring SIGTERM would make wait forever."""
    script = textwrap.dedent(f"""
        import signal
        from data.loader import build_train_data
        data = build_train_data({str(assets["data"])!r}, max_seq_len=64, micro_batch_size=2, accum_iter=1,
                                world_size=1, rank=0, seed=0, num_workers=1, pad_id=0,
                                worker_ignores=[signal.SIGTERM])
        data.sampler.set_epoch(0)
        it = iter(data.loader)
        next(it)
        print("worker running", flush=True)
        # exit with the iterator (and its worker) still alive, as after an error in the training loop
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "worker running" in r.stdout, r.stderr[-2000:]
