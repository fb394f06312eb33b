"""Reliability: pre_tokenize.py under the failures of real clusters.

- SIGKILL at 10 seeded moments while 2 ranks run side by side (either rank or both; mid-commit, mid-item,
  at start-up; sometimes killed again during the re-run): every re-run ends byte-identical to a clean run.
- A full disk: a write error at the shard (RLIMIT_FSIZE in a child: EFBIG from the kernel) or at the
  record / error lines / done marker (ENOSPC injected in-process) stops the rank with a message naming
  the file; the re-run, with space again, completes identically.
- A record (or error) line torn mid-write is dropped and redone.

The kill-at-one-moment case of one rank is tests/test_pretokenize.py::test_kill9_mid_run_then_rerun_gives_
byte_identical_output; crash states fabricated at the writer level are in tests/test_pretokenize_writer.py.

Child runs fork from a forkserver that has the pipeline imported (a fresh interpreter per run would cost
~3 s of imports on this 2-core machine, 10 trials x 2 ranks). The figures are in tests/README.md.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import os
import resource
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.files as files
import data.pretok_writer as pretok_writer
import data.records as records
from pre_tokenize.pre_tokenize import PretokArgs, main, run

TARGET = "64"
N_ITEMS = 150        # 75 per rank: about a second of work per rank, so the moments land mid-run
SEED = 20240607
FILES = ["tokens.bin", "record.jsonl", "errors.jsonl", "run.json", "done.json"]
LOG = logging.getLogger(__name__)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """N_ITEMS items over four tiny images; every 9th item is broken, so the errors file grows too."""
    d = tmp_path_factory.mktemp("kill_data")
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(32, 32), (48, 32), (32, 48), (40, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{k}.png")
    with open(d / "in.jsonl", "w") as f:
        for i in range(N_ITEMS):
            item = {"conversations": [{"from": "human", "value": "<|image|> What is it?"},
                                      {"from": "gpt", "value": f"Noise number {i}."}], "image": [f"{i % 4}.png"]}
            if i % 9 == 4:
                item["image"] = ["missing.png"]
            f.write(json.dumps(item) + "\n")
    return d / "in.jsonl"


def argv(data: Path, out: Path, bundle: Path, rank: int, splits: int = 2, *extra: str) -> list[str]:
    return ["--in_filename", str(data), "--out_dir", str(out), "--tokenizer_dir", str(bundle), "--target_size",
            TARGET, "--splits", str(splits), "--rank", str(rank), "--no_progress", "--threads", "1", *extra]


def rank_files(out: Path, rank: int, splits: int = 2) -> dict[str, bytes]:
    return {n: (out / f"{rank}-of-{splits}-{n}").read_bytes() for n in FILES}


@pytest.fixture(scope="module")
def reference(data, tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    for r in range(2):
        run(PretokArgs.parse(argv(data, out, tiny_bundle, r, 2, "--num_workers", "0")))
    return out


# ------------------------------------------------------------------------------------- child processes


@pytest.fixture(scope="module")
def ctx():
    """A forkserver context with the pipeline preloaded (children start in milliseconds, from a process
    that never ran torch, so forking is safe)."""
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["pytest", "numpy", "PIL.Image", "torch", "tokenizers", "pre_tokenize.pre_tokenize",
                              "data.item_processor", "data.pretok_workers", "model.tokenizer.bundle", "model.tokenizer.vqgan"])
    return c


def _child(args: list[str], log_path: str, fsize_limit: int | None) -> None:
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(levelname)s %(message)s")
    if fsize_limit is not None:  # a full disk: writes past this size fail with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    os._exit(main(args))


def start(ctx, args: list[str], log: Path, fsize_limit: int | None = None):
    p = ctx.Process(target=_child, args=(args, str(log), fsize_limit))
    p.start()
    return p


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def progress(out: Path, rank: int) -> dict:
    pre = out / f"{rank}-of-2-"
    return {"records": _lines(Path(f"{pre}record.jsonl")), "errors": _lines(Path(f"{pre}errors.jsonl")),
            "shard": _size(Path(f"{pre}tokens.bin")), "run.json": Path(f"{pre}run.json").exists(),
            "done": Path(f"{pre}done.json").exists()}


def pick_moment(rng: np.random.Generator, per_rank: int, shard_bytes: int) -> tuple[str, float]:
    """A kill moment: wall time since start, or a point of progress seen in the rank's files."""
    kind = rng.choice(["seconds", "records", "errors", "shard bytes"])
    if kind == "seconds":  # often during start-up (bundle and VQGAN loading, pool fork)
        return kind, float(rng.uniform(0.0, 0.6))
    if kind == "records":
        return kind, int(rng.integers(1, int(0.85 * per_rank)))
    if kind == "errors":
        return kind, int(rng.integers(1, per_rank // 9))
    return kind, int(rng.integers(17, int(0.85 * shard_bytes)))  # mid-item: shard bytes ahead of records


def reached(kind: str, value, t0: float, prog: dict) -> bool:
    if kind == "seconds":  # on a machine fast enough to finish first, the backstop still kills mid-run
        return time.monotonic() - t0 >= value or prog["records"] >= int(0.85 * N_ITEMS // 2)
    return {"records": lambda: prog["records"] >= value, "errors": lambda: prog["errors"] >= value,
            "shard bytes": lambda: prog["shard"] >= value}[kind]()


def kill_at(procs: dict, moments: dict, out: Path, timeout: float = 60.0) -> dict:
    """Polls the ranks' files; SIGKILLs each rank of ``moments`` at its moment. Returns what each victim had
    written when it was killed (or that it finished first)."""
    t0, seen = time.monotonic(), {}
    while len(seen) < len(moments):
        assert time.monotonic() - t0 < timeout, f"no kill moment reached in {timeout}s: {moments}"
        for r, (kind, value) in moments.items():
            if r in seen:
                continue
            prog = progress(out, r)
            if reached(kind, value, t0, prog):
                os.kill(procs[r].pid, signal.SIGKILL)
                procs[r].join(timeout=30)
                seen[r] = {"moment": f"{kind} >= {value:.3g}" if kind == "seconds" else f"{kind} >= {value}",
                           **progress(out, r), "exitcode": procs[r].exitcode}
            elif not procs[r].is_alive():
                seen[r] = {"moment": f"{kind} >= {value}", "finished first": True, **prog,
                           "exitcode": procs[r].exitcode}
        time.sleep(0.002)
    for p in procs.values():
        p.join(timeout=60)
        assert p.exitcode is not None, "a child did not finish"
    return seen


@pytest.mark.slow
def test_sigkill_at_ten_seeded_moments_across_two_ranks_then_rerun_is_byte_identical(data, reference, tiny_bundle,
                                                                                    ctx, tmp_path):
    per_rank = N_ITEMS // 2
    shard_bytes = _size(reference / "0-of-2-tokens.bin")
    ref = {r: rank_files(reference, r) for r in range(2)}
    trials = []
    for t in range(10):
        rng = np.random.default_rng([SEED, t])
        out = tmp_path / f"trial{t}"
        victims = {"rank 0": [0], "rank 1": [1], "both": [0, 1]}[rng.choice(["rank 0", "rank 1", "both"])]
        kills = []
        for attempt in range(2 if rng.random() < 0.3 else 1):  # sometimes the re-run is killed too
            moments = {r: pick_moment(rng, per_rank, shard_bytes) for r in victims}
            procs = {r: start(ctx, argv(data, out, tiny_bundle, r, 2, "--num_workers", str(rng.integers(0, 2)),
                                        "--batch_size", str(rng.integers(1, 5)), "--commit_items",
                                        str(rng.integers(1, 4))), tmp_path / f"t{t}.r{r}.a{attempt}.log")
                     for r in range(2) if r in victims or attempt == 0}
            seen = kill_at(procs, moments, out)
            for r, s in seen.items():
                assert "finished first" not in s, f"trial {t}: rank {r} finished before its kill moment: {s}"
                assert s["exitcode"] == -signal.SIGKILL and not s["done"], (t, r, s)
            kills += [{"rank": r, **s} for r, s in seen.items()]
            for r in procs:
                if r not in victims:
                    assert procs[r].exitcode == 0, (tmp_path / f"t{t}.r{r}.a{attempt}.log").read_text()
        # the plain re-run, other batch/worker settings; a finished rank is not redone
        for r in range(2):
            before = (out / f"{r}-of-2-done.json").stat().st_mtime_ns if r not in victims else None
            summary = run(PretokArgs.parse(argv(data, out, tiny_bundle, r, 2, "--num_workers",
                                                str(rng.integers(0, 2)), "--batch_size", str(rng.integers(1, 9)))))
            if r not in victims:
                assert summary == {"already_finished": True}
                assert (out / f"{r}-of-2-done.json").stat().st_mtime_ns == before
            assert rank_files(out, r) == ref[r], f"trial {t}: rank {r} differs from the clean run after {kills}"
        trials.append({"trial": t, "kills": kills})
    (tmp_path / "trials.json").write_text(json.dumps(trials, indent=1))
    LOG.info("kill trials: %s", json.dumps(trials))
    moments = [k["moment"].split(" >=")[0] for tr in trials for k in tr["kills"]]
    assert len(moments) >= 10
    assert any(k["records"] == 0 for tr in trials for k in tr["kills"]), "no kill before the first record"
    assert any(k["records"] > 0 for tr in trials for k in tr["kills"]), "no kill mid-run"


# ------------------------------------------------------------------------------------------ full disk


@pytest.mark.parametrize("limit", [3000, 9000])
def test_full_disk_at_the_shard_stops_with_a_clear_error_and_the_rerun_completes(data, reference, tiny_bundle, ctx,
                                                                                tmp_path, limit):
    """RLIMIT_FSIZE: the kernel fails the shard write that crosses ``limit`` bytes with EFBIG, partway."""
    out, log = tmp_path / "out", tmp_path / "child.log"
    p = start(ctx, argv(data, out, tiny_bundle, 0, 2, "--num_workers", "1", "--commit_items", "4"), log,
              fsize_limit=limit)
    p.join(timeout=60)
    text = log.read_text()
    assert p.exitcode == 2, text[-3000:]
    shard = out / "0-of-2-tokens.bin"
    assert f"{shard}: cannot write" in text and "File too large" in text and "re-run" in text, text[-3000:]
    assert "Traceback" not in text
    assert not (out / "0-of-2-done.json").exists() and _size(shard) <= limit
    run(PretokArgs.parse(argv(data, out, tiny_bundle, 0, 2, "--num_workers", "0")))
    assert rank_files(out, 0) == rank_files(reference, 0)


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are used (the part that fits is written)."""

    def __init__(self, f, budget: list[int]):
        self._f, self._budget = f, budget

    def write(self, b) -> int:  # bytes, or str for text-mode files
        b = b if isinstance(b, str) else bytes(b)
        if len(b) > self._budget[0]:
            self._f.write(b[: self._budget[0]])
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("target,budget", [("0-of-2-record.jsonl", 700), ("0-of-2-errors.jsonl", 150),
                                           ("0-of-2-tokens.bin", 5000), (".0-of-2-done.json.tmp", 10)])
def test_no_space_left_at_any_output_file_stops_with_a_clear_error_and_the_rerun_completes(
        data, reference, tiny_bundle, tmp_path, monkeypatch, caplog, target, budget):
    out = tmp_path / "out"
    left = [budget]

    def full_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        name = Path(path).name
        return _FullDisk(f, left) if name.startswith(target) and any(c in mode for c in "wa+") else f

    for mod in (records, pretok_writer, files):
        monkeypatch.setattr(mod, "open", full_open, raising=False)
    assert main(argv(data, out, tiny_bundle, 0, 2, "--num_workers", "0", "--commit_items", "2")) == 2
    assert "No space left on device" in caplog.text and "re-run" in caplog.text, caplog.text[-3000:]
    assert f"{out / target.lstrip('.').split('.tmp')[0]}: cannot write" in caplog.text, caplog.text[-3000:]
    assert not (out / "0-of-2-done.json").exists()
    monkeypatch.undo()  # space freed
    run(PretokArgs.parse(argv(data, out, tiny_bundle, 0, 2, "--num_workers", "0")))
    assert rank_files(out, 0) == rank_files(reference, 0)


# ----------------------------------------------------------------------------------------- torn lines


@pytest.mark.parametrize("case", range(4))
def test_a_line_torn_mid_write_is_dropped_and_redone(data, reference, tiny_bundle, tmp_path, case):
    """The state a crash leaves when a line is half on disk: the done marker absent, a file cut inside a
    line (everything after it lost), the shard possibly longer than the records. Seeded cut points."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    for r in range(2):
        (out / f"{r}-of-2-done.json").unlink()
    rng = np.random.default_rng([SEED, 100 + case])
    for name in (["record.jsonl"], ["errors.jsonl"], ["record.jsonl", "errors.jsonl"], ["record.jsonl"])[case]:
        path = out / f"{case % 2}-of-2-{name}"
        data_ = path.read_bytes()
        ends = [i + 1 for i, c in enumerate(data_) if c == ord("\n")]
        k = int(rng.integers(1, len(ends)))
        cut = int(rng.integers(ends[k - 1] + 1, ends[k]))  # strictly inside line k
        path.write_bytes(data_[:cut] + (b"\x00" * 7 if case == 3 else b""))  # case 3: zero-filled tail
    for r in range(2):
        run(PretokArgs.parse(argv(data, out, tiny_bundle, r, 2, "--num_workers", "0")))
        assert rank_files(out, r) == rank_files(reference, r)
