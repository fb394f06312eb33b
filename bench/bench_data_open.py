"""Benchmark: opening N pre-tokenized records through the memory-mapped index vs json.load of record.json.

    python bench/bench_data_open.py                     # 1M records (about a minute to build)
    python bench/bench_data_open.py --n 10000000        # the 10M case of bench/RESULTS.md (~10 min, ~6 GB for json.load)
    python bench/bench_data_open.py --n 100000 --skip_json
    python bench/bench_data_open.py --n 1000000 --lumina  # Lumina per-item .pkl records (paths only)
    python bench/bench_data_open.py --n 3000000 --lumina --build --old_build_rev fb9a0ef --rounds 2
        # first open of Lumina records: the streamed index build vs json.load vs the build at fb9a0ef

Builds (once per N, reused) a record.json JSON array of N records over ``--shards`` token shards, the
index beside it (data.records.build_index), and sparse shard files of the right size (the open-time
size check reads only the size; no token is read). With ``--lumina`` the records are Lumina's instead:
one ``.pkl`` path per item, no offset (the pickles are not written: opening does not touch them). Then, each in a fresh process so that time and peak
RSS (ru_maxrss) are those of one rank opening the data:
  * open: ``RecordDataset([DataSource(record.json)], max_seq_len)`` (index + open-time validation),
    then the first epoch's sampler plan (``ResumableBatchSampler.global_batches()``, G = --global_batch);
  * json: ``json.load(record.json)``, what Lumina's trainer does at start.
With ``--build``, also the first open, when no index exists yet (``--rounds`` interleaved repetitions):
  * build: ``data.records.build_index(record.json)`` (streamed), into a scratch copy of the index dir;
  * build_old (with ``--old_build_rev REV``): the same with ``data/records.py`` as of git revision REV
    (the whole-file build before streaming), imported from ``git show`` into the child.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.records import SHARD_HEADER, Record, build_index, index_is_current, shard_end_bytes, shard_name

logger = logging.getLogger("bench_data_open")


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    """A mix of captions (50-300), 512px images (~1060 + prompt) and multi-image items (2-3k)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[0.3, 0.55, 0.15])
    return np.where(kind == 0, rng.integers(50, 300, n),
                    np.where(kind == 1, 1060 + rng.integers(10, 120, n), rng.integers(2000, 3000, n))).astype(np.int64)


def build_lumina(out: Path, n: int) -> Path:
    """Writes a Lumina-style record.json (+ index) of n per-item pickle records (pickles not written)."""
    rec = out / "record.json"
    done = out / "BUILT"
    if done.exists() and done.read_text() == f"{n} lumina" and index_is_current(rec):
        return rec
    out.mkdir(parents=True, exist_ok=True)
    lens = _lengths(n)
    pkl = str(out / "files" / "{}.pkl")
    with open(rec, "w") as f:
        f.write("[\n")
        for lo in tqdm(range(0, n, 100_000), desc="record.json", unit_scale=100_000):
            hi = min(n, lo + 100_000)
            f.write(",\n".join(f'{{"file": "{pkl.format(i)}", "len": {lens[i]}, "id": {i}}}' for i in range(lo, hi)))
            f.write(",\n" if hi < n else "\n")
        f.write("]\n")
    records = (Record(i, pkl.format(i), int(lens[i])) for i in range(n))
    build_index(rec, records=tqdm(records, total=n, desc="index", mininterval=5))
    done.write_text(f"{n} lumina")
    return rec


def build(out: Path, n: int, shards: int) -> Path:
    """Writes record.json (+ index, + sparse shards) for n records unless already there."""
    rec = out / "record.json"
    done = out / "BUILT"
    if done.exists() and done.read_text() == f"{n} {shards}" and index_is_current(rec):
        return rec
    out.mkdir(parents=True, exist_ok=True)
    lens = _lengths(n)
    per = -(-n // shards)
    offsets = np.zeros(n, dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(shards):
        lo, hi = s * per, min(n, (s + 1) * per)
        offsets[lo:hi] = np.concatenate(([0], np.cumsum(2 * lens[lo:hi])[:-1])) if hi > lo else []
        with open(out / shard_name(s, shards), "wb") as f:
            f.write(SHARD_HEADER)
            f.truncate(shard_end_bytes(int(offsets[hi - 1]), int(lens[hi - 1])) if hi > lo else len(SHARD_HEADER))
    with open(rec, "w") as f:
        f.write("[\n")
        for lo in tqdm(range(0, n, 100_000), desc="record.json", unit_scale=100_000):
            hi = min(n, lo + 100_000)
            f.write(",\n".join(f'{{"id": {i}, "file": "{shard_name(i // per, shards)}", "len": {lens[i]}, '
                               f'"offset": {offsets[i]}}}' for i in range(lo, hi)))
            f.write(",\n" if hi < n else "\n")
        f.write("]\n")
    t1 = time.perf_counter()
    records = (Record(i, shard_name(i // per, shards), int(lens[i]), int(offsets[i])) for i in range(n))
    build_index(rec, records=tqdm(records, total=n, desc="index", mininterval=5))
    logger.info("built %d records in %.1f s (record.json %.0f MB), index in %.1f s", n, t1 - t0,
                rec.stat().st_size / 1e6, time.perf_counter() - t1)
    done.write_text(f"{n} {shards}")
    return rec


def _peak_rss_mb() -> float:
    """Peak RSS of this process image. Not ru_maxrss: Linux carries the parent's peak across fork+exec
    into it, so a child started by a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark measures RSS on Linux only)")


def child_open(rec: Path, global_batch: int) -> dict:
    from data.data_config import DataSource
    from data.dataset import RecordDataset
    from data.sampler import ResumableBatchSampler

    base = _peak_rss_mb()
    t0 = time.perf_counter()
    ds = RecordDataset([DataSource(rec)], max_seq_len=4096)
    t1 = time.perf_counter()
    open_rss = _peak_rss_mb()
    if ds.locate(len(ds) - 1)[0].columns().offset[-1] >= 0:
        ds[len(ds) - 1]  # one item read (sparse shard: zeros), proves the maps work
    s = ResumableBatchSampler(ds, micro_batch_size=global_batch, accum_iter=1, world_size=1, rank=0, seed=0)
    s.global_batches()
    t2 = time.perf_counter()
    return {"items": len(ds), "open_s": t1 - t0, "rss_after_imports_mb": base, "peak_rss_open_mb": open_rss,
            "plan_s": t2 - t1, "peak_rss_with_plan_mb": _peak_rss_mb()}


def child_json(rec: Path) -> dict:
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    with open(rec) as f:
        arr = json.load(f)
    return {"items": len(arr), "open_s": time.perf_counter() - t0, "rss_after_imports_mb": base,
            "peak_rss_open_mb": _peak_rss_mb()}


def child_build(rec: Path, old_rev: str | None) -> dict:
    """Builds the index of a copy-free alias of ``rec`` (a hard link in a scratch dir, so the real index
    stays) and reports time and peak RSS."""
    import importlib.util
    import shutil

    scratch = rec.parent / f"build-{os.getpid()}"
    scratch.mkdir()
    try:
        alias = scratch / rec.name
        os.link(rec, alias)
        if old_rev:
            src = subprocess.run(["git", "show", f"{old_rev}:data/records.py"], check=True, capture_output=True,
                                 text=True, cwd=Path(__file__).resolve().parents[1]).stdout
            spec = importlib.util.spec_from_loader("records_old", loader=None)
            mod = importlib.util.module_from_spec(spec)
            sys.modules["records_old"] = mod
            exec(compile(src, f"{old_rev}:data/records.py", "exec"), mod.__dict__)
            build_fn = mod.build_index
        else:
            from data.records import build_index as build_fn
        base = _peak_rss_mb()
        t0 = time.perf_counter()
        out = build_fn(alias)
        dt = time.perf_counter() - t0
        count = json.loads((out / "meta.json").read_text())["count"]
        return {"items": count, "open_s": dt, "rss_after_imports_mb": base, "peak_rss_open_mb": _peak_rss_mb()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_child(kind: str, rec: Path, global_batch: int, old_rev: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--record", str(rec),
           "--global_batch", str(global_batch)] + (["--old_build_rev", old_rev] if old_rev else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="number of records")
    p.add_argument("--shards", type=int, default=8, help="token shards (pre-tokenization ranks) the records point at")
    p.add_argument("--out_dir", type=Path, default=Path(__file__).parent / "out" / "data_open",
                   help="where the generated data goes (reused for the same --n and --shards)")
    p.add_argument("--global_batch", type=int, default=256, help="global batch size for the sampler plan timing")
    p.add_argument("--lumina", action="store_true",
                   help="Lumina per-item .pkl records instead of our shard records (shows their open cost)")
    p.add_argument("--skip_json", action="store_true", help="do not time json.load (it needs ~600 B RSS per record)")
    p.add_argument("--build", action="store_true",
                   help="also time the first open: building the index from record.json (streamed)")
    p.add_argument("--old_build_rev", default=None,
                   help="with --build: also time the index build of data/records.py at this git revision")
    p.add_argument("--rounds", type=int, default=1, help="with --build: interleaved repetitions")
    p.add_argument("--child", choices=["open", "json", "build", "build_old"], default=None,
                   help="internal: run one measurement in this process and print it as JSON")
    p.add_argument("--record", type=Path, default=None, help="internal: the record file for --child")
    args = p.parse_args()
    if args.child:
        if args.child == "open":
            res = child_open(args.record, args.global_batch)
        elif args.child == "json":
            res = child_json(args.record)
        else:
            res = child_build(args.record, args.old_build_rev if args.child == "build_old" else None)
        print(json.dumps(res))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.lumina:
        rec = build_lumina(args.out_dir / f"lumina-n{args.n}", args.n)
    else:
        rec = build(args.out_dir / f"n{args.n}", args.n, args.shards)
    if args.build:
        _compare_builds(rec, args)
        return
    opened = _run_child("open", rec, args.global_batch)
    print(f"index open  : {opened['items']} items in {opened['open_s']:.3f} s, peak RSS "
          f"{opened['peak_rss_open_mb']:.0f} MB (after imports {opened['rss_after_imports_mb']:.0f} MB); "
          f"first epoch plan (G={args.global_batch}, clustering) {opened['plan_s']:.2f} s, peak RSS "
          f"{opened['peak_rss_with_plan_mb']:.0f} MB")
    if not args.skip_json:
        js = _run_child("json", rec, args.global_batch)
        print(f"json.load   : {js['items']} items in {js['open_s']:.3f} s, peak RSS {js['peak_rss_open_mb']:.0f} MB "
              f"(after imports {js['rss_after_imports_mb']:.0f} MB)")
        print(f"ratio       : index open is {js['open_s'] / opened['open_s']:.0f}x faster and uses "
              f"{js['peak_rss_open_mb'] / opened['peak_rss_open_mb']:.1f}x less peak RSS than json.load")


def _compare_builds(rec: Path, args) -> None:
    """Interleaved rounds of: streamed build, json.load, old build (if asked); the best of each and ratios."""
    kinds = ["build", "json"] + (["build_old"] if args.old_build_rev else [])
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds:
            res = _run_child(k, rec, args.global_batch, args.old_build_rev)
            runs[k].append(res)
            print(f"round {r}: {k:9s} {res['items']} items in {res['open_s']:.2f} s, peak RSS "
                  f"{res['peak_rss_open_mb']:.0f} MB (after imports {res['rss_after_imports_mb']:.0f} MB)")
    best = {k: min(v, key=lambda x: x["open_s"]) for k, v in runs.items()}
    peak = {k: max(x["peak_rss_open_mb"] for x in v) for k, v in runs.items()}
    for k in kinds:
        print(f"{k:9s}: best {best[k]['open_s']:.2f} s, peak RSS {peak[k]:.0f} MB; time / json.load "
              f"{best[k]['open_s'] / best['json']['open_s']:.2f}x, peak RSS / json.load {peak[k] / peak['json']:.2f}x")
    print(f"load average after the runs: {os.getloadavg()}")


if __name__ == "__main__":
    main()
