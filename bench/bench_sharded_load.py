"""Benchmark: host memory and time of loading the starting weights, sharded (by slices) vs the rank-0 path.

    python bench/bench_sharded_load.py                              # ~335M parameters, 2 ranks, 2 rounds
    python bench/bench_sharded_load.py --layers 4 --hidden 512 --rounds 1   # a quick look

Writes (once per shape, reused; deleted at the end unless --keep) a random-weights Chameleon checkpoint as
Lumina releases it: bf16, safetensors in --files shards listed by model.safetensors.index.json. Then, in
interleaved rounds, ``torchrun --nproc_per_node --ranks`` runs one load per fresh process group, as the
trainer does it: build on the meta device, FSDP2-shard (model/training/parallelize.py, fp32 parameters), ``to_empty``,
then either ``model.sharded_load.load_sharded_safetensors`` ("sharded") or
``finetune_solver._load_initial_weights`` ("rank0": rank 0 reads everything, set_model_state_dict
broadcasts).

Memory, per rank, relative to the model's size in bytes (fp32 parameters, as trained):
  * peak RSS: the kernel's high-water mark of the process's resident memory (VmHWM), reset just before the
    model is built (``echo 5 > /proc/self/clear_refs``), minus the RSS at that moment. It counts the pages
    of the weight files that the process maps (safetensors reads through mmap) as well as its own memory.
  * peak private: the highest RssAnon (anonymous memory only: tensors, buffers; not the file pages, which
    are page cache shared by all ranks of a machine and dropped under pressure), sampled every 2 ms by a
    thread, minus RssAnon at the reset.
Time: wall time of the load call (the slowest rank), best of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark measures memory on Linux only)")


class AnonPeak:
    """Samples RssAnon every ``period`` seconds in a thread; ``peak_kb`` is the highest seen."""

    def __init__(self, period: float = 0.002):
        self.peak_kb = _status_kb("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._t.start()

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
            time.sleep(period)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
        return self.peak_kb


def config_dict(a) -> dict:
    return {"model_type": "chameleon", "vocab_size": a.vocab, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
            "num_attention_heads": a.hidden // 64, "num_key_value_heads": a.hidden // 64,
            "intermediate_size": a.intermediate or 4 * a.hidden, "max_position_embeddings": 4096,
            "vocabulary_map": {"<image>": 8711}, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def write_checkpoint(out: Path, a) -> tuple[Path, int]:
    """A random bf16 checkpoint in ``a.files`` safetensors shards; returns (dir, number of parameters).
    Tensors are made one at a time and a shard is written as soon as it is full (memory: one shard)."""
    import torch
    from safetensors.torch import save_file

    from model.chameleon_lm import build_chameleon_lm, config_from_dict

    cfg = config_dict(a)
    lm = build_chameleon_lm(config_from_dict(cfg), device="meta")
    shapes = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    marker = out / "WRITTEN"
    if marker.exists() and marker.read_text() == json.dumps(cfg):
        return out, n_params
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    per_file = -(-n_params // a.files)
    g = torch.Generator().manual_seed(0)
    weight_map, part, part_n, i = {}, {}, 0, 0

    def flush():
        nonlocal part, part_n, i
        name = f"model-{i + 1:05d}-of-{a.files:05d}.safetensors"
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        part, part_n, i = {}, 0, i + 1

    for k, s in shapes.items():
        part[k] = (torch.randn(s, generator=g) * 0.02).bfloat16()
        part_n += torch.Size(s).numel()
        if part_n >= per_file:
            flush()
    if part:
        flush()
    if i != a.files:  # fewer files than asked (few big tensors): rename so the names say N-of-N
        for j, name in enumerate(sorted(set(weight_map.values()))):
            new = f"model-{j + 1:05d}-of-{i:05d}.safetensors"
            (out / name).rename(out / new)
            weight_map = {k: (new if v == name else v) for k, v in weight_map.items()}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * n_params},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    marker.write_text(json.dumps(cfg))
    return out, n_params


def child(mode: str, model_dir: Path, result_dir: Path) -> None:
    """One rank of one load (under torchrun)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import finetune_solver
    from model.chameleon_lm import build_chameleon_lm, load_hf_config
    from model.training.distributed import detect_launch_env, init_distributed
    from model.training.parallelize import parallelize
    from model.sharded_load import load_sharded_safetensors

    torch.set_num_threads(1)
    launch = detect_launch_env()
    init_distributed(launch, timeout_s=600)
    rank, world = launch.rank, launch.world_size
    config = load_hf_config(model_dir)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    rss0, anon0 = _status_kb("VmRSS"), _status_kb("RssAnon")
    sampler = AnonPeak()
    lm = build_chameleon_lm(config, device="meta")
    parallelize(lm, init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)), precision="fp32")
    lm.to_empty(device="cpu")
    lm.reset_nonpersistent_buffers("cpu")
    dist.barrier()
    t0 = time.perf_counter()
    if mode == "sharded":
        load_sharded_safetensors(lm, model_dir)
    else:
        finetune_solver._load_initial_weights(lm, str(model_dir), rank)
    dt = time.perf_counter() - t0
    anon_peak = sampler.stop()
    hwm = _status_kb("VmHWM")
    check = sum(float(p.to_local().double().sum()) for p in lm.parameters())  # same weights in both modes
    times = [None] * world
    dist.all_gather_object(times, dt)
    res = {"mode": mode, "rank": rank, "load_s": max(times), "peak_rss_mb": (hwm - rss0) / 1024,
           "peak_private_mb": (anon_peak - anon0) / 1024, "local_sum": check}
    (result_dir / f"{mode}-rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def run_load(mode: str, model_dir: Path, ranks: int, result_dir: Path) -> list[dict]:
    shutil.rmtree(result_dir, ignore_errors=True)
    result_dir.mkdir(parents=True)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__), "--child", mode,
           "--model_dir", str(model_dir), "--result_dir", str(result_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return [json.loads((result_dir / f"{mode}-rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (heads of 64)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 4 x hidden)")
    p.add_argument("--vocab", type=int, default=65536, help="vocabulary size (Chameleon's)")
    p.add_argument("--files", type=int, default=4, help="safetensors shards of the checkpoint")
    p.add_argument("--ranks", type=int, default=2, help="processes (gloo on CPU)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of each mode")
    p.add_argument("--out_dir", type=Path, default=REPO / "bench" / "out" / "sharded_load",
                   help="where the checkpoint goes")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (default: delete it at the end)")
    p.add_argument("--child", choices=["sharded", "rank0"], default=None, help="internal: one rank of one load")
    p.add_argument("--model_dir", type=Path, default=None, help="internal: the checkpoint for --child")
    p.add_argument("--result_dir", type=Path, default=None, help="internal: where --child writes its result")
    a = p.parse_args()
    if a.child:
        child(a.child, a.model_dir, a.result_dir)
        return
    t0 = time.perf_counter()
    model_dir, n_params = write_checkpoint(a.out_dir / "model", a)
    model_mb = 4 * n_params / 2**20
    print(f"checkpoint: {n_params / 1e6:.1f}M parameters, {2 * n_params / 2**20:.0f} MB bf16 in "
          f"{len(list(model_dir.glob('*.safetensors')))} files, written in {time.perf_counter() - t0:.0f} s; "
          f"model size (fp32 parameters) {model_mb:.0f} MB")
    rows: dict[str, list[list[dict]]] = {"sharded": [], "rank0": []}
    try:
        for r in range(a.rounds):
            for mode in ("sharded", "rank0"):
                res = run_load(mode, model_dir, a.ranks, a.out_dir / "results")
                rows[mode].append(res)
                print(f"round {r} {mode:7s}: load {res[0]['load_s']:.1f} s; per rank peak RSS "
                      + ", ".join(f"{x['peak_rss_mb']:.0f} MB ({x['peak_rss_mb'] / model_mb:.2f}x)" for x in res)
                      + "; peak private " + ", ".join(f"{x['peak_private_mb']:.0f} MB "
                                                      f"({x['peak_private_mb'] / model_mb:.2f}x)" for x in res))
        same = all(abs(x["local_sum"] - y["local_sum"]) < 1e-6 * max(1.0, abs(y["local_sum"]))
                   for x, y in zip(rows["sharded"][0], rows["rank0"][0]))
        print(f"same weights loaded by both paths (per-rank sums): {same}")
        for mode, runs in rows.items():
            best = min(run[0]["load_s"] for run in runs)
            rss = max(x["peak_rss_mb"] for run in runs for x in run)
            priv = max(x["peak_private_mb"] for run in runs for x in run)
            print(f"{mode:7s}: best load {best:.1f} s; worst rank peak RSS {rss:.0f} MB = {rss / model_mb:.2f}x the "
                  f"model, peak private {priv:.0f} MB = {priv / model_mb:.2f}x")
        print(f"load average after the runs: {os.getloadavg()}")
    finally:
        if not a.keep:
            shutil.rmtree(a.out_dir / "model", ignore_errors=True)
        shutil.rmtree(a.out_dir / "results", ignore_errors=True)


if __name__ == "__main__":
    main()
