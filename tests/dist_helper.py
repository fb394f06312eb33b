"""Helpers for the trainer's tests: real multi-process runs with a timeout, and tiny training assets.

- ``run(cmd, timeout)``: a subprocess that must finish in ``timeout`` seconds (killed and failed if not).
- ``torchrun(nproc, argv)``: the command line of ``torchrun --nproc_per_node N`` on a free port.
- ``spawn(fn, world_size, timeout, env_for_rank)``: ``fn(rank)`` in N fresh processes with per-rank
  environment variables (e.g. a simulated SLURM job); a hang or a crash fails the test.
- ``make_learnable_data(dir)``: pre-tokenized records (our shard format) of a tiny data set a model learns
  in a few steps (sequences determined by their first token), text and image-code tokens, varied lengths.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from data.records import IGNORE_INDEX, Record, ShardWriter, record_name, shard_name

REPO = Path(__file__).resolve().parents[1]
TEXT_LO = 9100  # tiny-bundle text BPE ids lie above the reserved block (8194..8999 + 4)
IMAGE_LO, IMAGE_HI = 4, 8196  # image codes, as in Chameleon's layout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float, env: Mapping[str, str] | None = None, check: bool = True,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs ``cmd``; on timeout it is killed (with its process group) and the test fails with its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-6000:]}") from None
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return res


def torchrun(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *argv]


def _child(fn: Callable[[int], None], rank: int, env: dict, q) -> None:
    os.environ.update(env)
    try:
        fn(rank)
        q.put((rank, None))
    except BaseException:  # noqa: BLE001 - report any failure of the child to the parent test
        q.put((rank, traceback.format_exc()))


def spawn(fn: Callable[[int], None], world_size: int, timeout: float,
          env_for_rank: Callable[[int], dict] = lambda r: {}, silent_ranks: tuple[int, ...] = ()) -> None:
    """Runs ``fn(rank)`` in ``world_size`` spawned processes; fails on any error, crash or timeout.
    ``silent_ranks`` may exit without reporting (a test of a rank that dies on purpose)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, env_for_rank(r), q), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    reports: dict[int, str | None] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(reports) < world_size:
            try:
                rank, err = q.get(timeout=0.2)
                reports[rank] = err
                continue
            except queue.Empty:
                pass
            if all(not p.is_alive() for p in procs):
                while True:  # drain what arrived in the meantime
                    try:
                        rank, err = q.get(timeout=0.5)
                        reports[rank] = err
                    except queue.Empty:
                        break
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"distributed test did not finish in {timeout}s (hung ranks: "
                                     f"{[r for r, p in enumerate(procs) if p.is_alive()]})")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {r: e for r, e in reports.items() if e}
    missing = [r for r in range(world_size) if r not in reports and r not in silent_ranks]
    if missing:
        errors.update({r: f"exited with code {procs[r].exitcode} without reporting" for r in missing})
    if errors:
        raise AssertionError("\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items())))


def make_learnable_data(out: Path, n_items: int = 32, n_patterns: int = 4, seed: int = 0) -> Path:
    """Writes shards + ``record.json`` + ``data.yaml`` into ``out``; returns the YAML path.

    Item k: BOS(0), a pattern token, then that pattern's fixed continuation (text ids and a run of image
    codes), cut to a length between 12 and 40. Everything after the pattern token is labelled.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    conts = []
    for _ in range(n_patterns):
        text = rng.integers(TEXT_LO, TEXT_LO + 200, size=30)
        codes = rng.integers(IMAGE_LO, IMAGE_HI, size=10)
        conts.append(np.concatenate([text[:15], codes, text[15:]]))
    records = []
    with ShardWriter(out / shard_name(0, 1)) as w:
        for k in range(n_items):
            p = k % n_patterns
            n = int(rng.integers(12, 41))
            toks = np.concatenate([[0, TEXT_LO + 500 + p], conts[p]])[:n]
            labels = toks.copy()
            labels[:2] = IGNORE_INDEX
            off = w.append(toks.tolist(), labels.tolist())
            records.append(Record(id=k, file=shard_name(0, 1), len=n, offset=off))
    (out / record_name(0, 1)).write_text("".join(r.to_json() + "\n" for r in records))
    (out / "record.json").write_text(json.dumps([json.loads(r.to_json()) for r in records]))
    (out / "data.yaml").write_text("META:\n  - path: record.json\n    type: default\n")
    return out / "data.yaml"
