"""Benchmark: peak memory of reading a multi-GB Hugging Face shard (--in_format parquet / hf) vs the shard's size.

    python bench/bench_arrow_memory.py                       # a 1.5 GB shard of each layout, deleted afterwards
    python bench/bench_arrow_memory.py --gb 4 --dir /scratch # bigger, elsewhere

Writes, in the layout and schema ``datasets`` uses for an image set (``conversations`` list of from/value,
``image`` struct {bytes, path}; ``--image_kb`` of incompressible bytes per image, so the file is as big as its
images):
  * ``rg100.parquet``: row groups of 100 rows (what ``to_parquet`` / ``push_to_hub`` write for image sets);
  * ``rg_all.parquet``: the whole shard in ONE row group (pyarrow's default up to 1M rows: the worst case);
  * ``disk/``: a ``save_to_disk`` folder (state.json + one Arrow IPC stream, record batches of 100 rows).
Then reads every item through ``open_input(...).iter_items`` (what pre_tokenize.py's main process does:
conversations and image bytes into Python objects, a batch at a time), each in a fresh process, and
reports its peak resident memory (VmHWM, and the peak of anonymous and file-backed pages sampled every
50 items) above the process's memory after imports, next to the shard's size. Baseline in the same run:
``pyarrow.parquet.read_table`` of the needed columns (the whole table in memory, what a naive reader
does). Times are for information only (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_GROUP = 100


def status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    return out


def write_data(d: Path, gb: float, image_kb: int) -> dict[str, Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = int(gb * 1024 * 1024 / image_kb)
    features = {"info": {"features": {
        "conversations": {"feature": {"from": {"dtype": "string", "_type": "Value"},
                                      "value": {"dtype": "string", "_type": "Value"}}, "_type": "List"},
        "image": {"_type": "Image"}}}}
    schema = pa.schema([("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
                        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))],
                       metadata={"huggingface": json.dumps(features)})
    rng = np.random.default_rng(0)
    blob = rng.bytes(image_kb * 1024 + ROWS_PER_GROUP)

    def batch(lo: int, hi: int) -> pa.RecordBatch:
        conv = [[{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                 {"from": "gpt", "value": f"Noise number {i}."}] for i in range(lo, hi)]
        image = [{"bytes": blob[i % ROWS_PER_GROUP:i % ROWS_PER_GROUP + image_kb * 1024], "path": None}
                 for i in range(lo, hi)]
        return pa.RecordBatch.from_pylist([{"conversations": c, "image": m} for c, m in zip(conv, image)], schema)

    paths = {"rg100": d / "rg100.parquet", "rg_all": d / "rg_all.parquet", "disk": d / "disk"}
    with pq.ParquetWriter(paths["rg100"], schema) as w:
        for lo in range(0, n, ROWS_PER_GROUP):
            w.write_batch(batch(lo, min(n, lo + ROWS_PER_GROUP)), row_group_size=ROWS_PER_GROUP)
    # one row group: the writer buffers the whole group, so this is written from the rg100 file table by
    # table (peak memory of this step is the writer's, not the reader's under test)
    table = pq.read_table(paths["rg100"])
    pq.write_table(table, paths["rg_all"], row_group_size=len(table) + 1)
    del table
    paths["disk"].mkdir()
    with pa.OSFile(str(paths["disk"] / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        for lo in range(0, n, ROWS_PER_GROUP):
            w.write_batch(batch(lo, min(n, lo + ROWS_PER_GROUP)))
    (paths["disk"] / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                          "_split": None}))
    return paths


def size_of(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size


def read_child(kind: str, path: str) -> None:
    """In a fresh process: read every item (or the whole table, for the baseline); print JSON figures."""
    import pyarrow.parquet as pq

    from data.inputs.dispatch import open_input

    base = status_kb()
    t0 = time.perf_counter()
    peak_anon = peak_file = 0
    n = nbytes = 0
    if kind == "read_table":
        import pyarrow.compute as pc

        table = pq.read_table(path, columns=["conversations", "image"])
        n = table.num_rows
        nbytes = sum(pc.sum(pc.binary_length(c.field("bytes"))).as_py() for c in table.column("image").chunks)
        s = status_kb()
        peak_anon, peak_file = s["RssAnon"], s["RssFile"]
    else:
        src = open_input(path, kind)
        for it in src.iter_items(range(len(src))):
            n += 1
            nbytes += len(it.item["image"][0])
            if n % 50 == 0:
                s = status_kb()
                peak_anon, peak_file = max(peak_anon, s["RssAnon"]), max(peak_file, s["RssFile"])
    end = status_kb()
    print(json.dumps({"items": n, "image_bytes": nbytes, "seconds": time.perf_counter() - t0,
                      "base_rss_kb": base["VmRSS"], "hwm_kb": end["VmHWM"], "peak_anon_kb": peak_anon,
                      "peak_file_kb": peak_file, "base_anon_kb": base["RssAnon"], "base_file_kb": base["RssFile"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.5, help="size of each shard in GB (default: %(default)s)")
    ap.add_argument("--image_kb", type=int, default=512, help="bytes per image, in KB (default: %(default)s)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the shards afterwards")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        read_child(*args.child)
        return
    d = Path(tempfile.mkdtemp(prefix="bench_arrow_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        paths = write_data(d, args.gb, args.image_kb)
        print(f"wrote the shards in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        runs = [("parquet", paths["rg100"], "rg100.parquet (row groups of 100)"),
                ("parquet", paths["rg_all"], "rg_all.parquet (one row group)"),
                ("hf", paths["disk"], "save_to_disk folder (Arrow stream)"),
                ("read_table", paths["rg100"], "baseline: pq.read_table (rg100)")]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        print("| shard | size (MB) | items | peak RSS above start (MB) | anon / file-backed peak (MB) | "
              "peak / size | s |")
        print("|---|---|---|---|---|---|---|")
        for kind, path, label in runs:
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            size = size_of(path) / 2**20
            above = (r["hwm_kb"] - r["base_rss_kb"]) / 1024
            print(f"| {label} | {size:.0f} | {r['items']} | {above:.0f} | "
                  f"{(r['peak_anon_kb'] - r['base_anon_kb']) / 1024:.0f} / "
                  f"{(r['peak_file_kb'] - r['base_file_kb']) / 1024:.0f} | {above / size:.3f} | "
                  f"{r['seconds']:.1f} |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
