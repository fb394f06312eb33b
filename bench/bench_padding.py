"""Benchmark: padding waste of the real sampler + collate on a realistic length mix.

    python bench/bench_padding.py                                            # defaults below, ~10 s
    python bench/bench_padding.py --micro_batch_size 32 --accum_iter 1       # packing needs many items per micro-batch

The mix (``--n`` items, one ``type``, so every global batch may mix all kinds; fractions settable):
  * captions / short text turns: 50-300 tokens (uniform)
  * one 512px image with its prompt: 1060 image tokens + 10-120 text tokens
  * multi-image items: 2000-3000 tokens (uniform)
with max_seq_len 4096. For each setting, the epoch's global batches come from
``data.sampler.ResumableBatchSampler`` (G = micro_batch_size * accum_iter * world_size), are cut into
micro-batches the way ranks cut them, and ``data.collate.padding_waste_of_lengths`` gives the fraction of
token slots that are padding (what ``collate`` would emit; checked against real collated batches in
tests/test_collate_packing.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from data.collate import padding_waste_of_lengths
from data.data_config import DataSource
from data.packing import pack_rows
from data.sampler import ResumableBatchSampler


class LengthsOnly(SimpleNamespace):
    """What the sampler reads from a dataset, for items that exist only as lengths."""

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def length_mix(n: int, p_caption: float, p_image: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[p_caption, p_image, 1 - p_caption - p_image])
    caption = rng.integers(50, 301, n)
    image = 1060 + rng.integers(10, 121, n)
    multi = rng.integers(2000, 3001, n)
    return np.where(kind == 0, caption, np.where(kind == 1, image, multi)).astype(np.int32)


def waste(ds, args, clustering: bool, packing: bool, pad_to_max_len: bool) -> tuple[float, float]:
    """(padding waste, rows per micro-batch) over one epoch."""
    s = ResumableBatchSampler(ds, micro_batch_size=args.micro_batch_size, accum_iter=args.accum_iter,
                              world_size=args.world_size, rank=0, seed=args.seed, length_clustering=clustering)
    micro = ds.lengths[s.global_batches()].reshape(-1, args.micro_batch_size).tolist()
    w = padding_waste_of_lengths(micro, args.max_seq_len, packing=packing, pad_to_max_len=pad_to_max_len)
    rows = sum(len(pack_rows(m, args.max_seq_len)) for m in micro) if packing else len(micro) * args.micro_batch_size
    return w, rows / len(micro)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="items in the synthetic dataset")
    p.add_argument("--p_caption", type=float, default=0.3, help="fraction of 50-300-token items")
    p.add_argument("--p_image", type=float, default=0.55, help="fraction of 1060+prompt-token items (rest: 2-3k)")
    p.add_argument("--max_seq_len", type=int, default=4096, help="truncation / packing row length")
    p.add_argument("--micro_batch_size", type=int, default=4, help="items per micro-batch (per rank)")
    p.add_argument("--accum_iter", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--world_size", type=int, default=8, help="ranks (only G = mbs*accum*world matters)")
    p.add_argument("--seed", type=int, default=0, help="sampler and length-mix seed")
    args = p.parse_args()
    lengths = length_mix(args.n, args.p_caption, args.p_image, args.seed)
    ds = LengthsOnly(sources=[DataSource(Path("synthetic"))], source_ranges=[(0, args.n)], source_type=[0],
                     type_names=["default"], lengths=lengths, max_seq_len=args.max_seq_len)
    G = args.micro_batch_size * args.accum_iter * args.world_size
    print(f"{args.n} items, mean length {lengths.mean():.0f}, max_seq_len {args.max_seq_len}, "
          f"micro_batch_size {args.micro_batch_size}, global batch {G}")
    print(f"{'setting':52s} {'padding waste':>13s} {'rows/micro-batch':>17s}")
    for name, clustering, packing, fixed in [
            ("no clustering, pad to longest in micro-batch", False, False, False),
            ("length clustering, pad to longest in micro-batch", True, False, False),
            ("packing (no clustering), pad to longest row", False, True, False),
            ("packing + clustering, pad to longest row", True, True, False),
            ("no clustering, pad to max_seq_len (fixed shape)", False, False, True),
            ("length clustering, pad to max_seq_len", True, False, True),
            ("packing (no clustering), pad to max_seq_len", False, True, True)]:
        w, rows = waste(ds, args, clustering, packing, fixed)
        print(f"{name:52s} {100 * w:12.2f}% {rows:17.2f}")


if __name__ == "__main__":
    main()
