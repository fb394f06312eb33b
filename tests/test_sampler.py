"""ResumableBatchSampler: deterministic plans, ratio/type semantics, rank slices, exact resume."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.data_config import DataSource
from data.loader import build_train_data
from data.records import Record, ShardWriter, record_name, shard_name
from data.sampler import ResumableBatchSampler


class FakeDataset(SimpleNamespace):
    """The attributes the sampler reads, without files: sources of the given sizes, random lengths."""

    def __init__(self, sizes, types=None, ratios=None, seed=0, max_seq_len=4096):
        types = types or ["default"] * len(sizes)
        ratios = ratios or [1.0] * len(sizes)
        names = list(dict.fromkeys(types))
        starts = np.concatenate(([0], np.cumsum(sizes)))
        super().__init__(
            sources=[DataSource(Path(f"s{i}"), t, r) for i, (t, r) in enumerate(zip(types, ratios))],
            source_ranges=[(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])],
            source_type=[names.index(t) for t in types], type_names=names, max_seq_len=max_seq_len,
            lengths=np.random.default_rng(seed).integers(1, 5000, size=int(starts[-1])).astype(np.int32))

    def __len__(self):
        return int(self.lengths.shape[0])


def sampler(ds, mbs=2, accum=2, ws=1, rank=0, seed=0, clustering=True):
    return ResumableBatchSampler(ds, micro_batch_size=mbs, accum_iter=accum, world_size=ws, rank=rank,
                                 seed=seed, length_clustering=clustering)


def steps(s, n=None):
    """Consumes n global batches (all if None) from s; returns this rank's items per global batch."""
    out, it = [], iter(s)
    per_step = s.accum_iter
    while n is None or len(out) < n:
        mbs = []
        for _ in range(per_step):
            try:
                mbs.append(next(it))
            except StopIteration:
                return out
        out.append(sum(mbs, []))
    return out


def ranks_steps(ds, ws, **kw):
    """Global batches reassembled from every rank's micro-batches (ranks simulated in one process)."""
    per_rank = [steps(sampler(ds, ws=ws, rank=r, **kw)) for r in range(ws)]
    return [sum((per_rank[r][k] for r in range(ws)), []) for k in range(len(per_rank[0]))]


def test_plan_is_deterministic_from_seed_and_epoch():
    ds = FakeDataset([100, 60], types=["a", "b"])
    a, b = sampler(ds), sampler(ds)
    assert steps(a) == steps(b)
    a.set_epoch(1)
    b.set_epoch(1)
    e1 = steps(a)
    assert e1 == steps(b)
    assert e1 != steps(sampler(ds)) and steps(sampler(ds, seed=1)) != steps(sampler(ds))


def test_global_batch_holds_one_type_and_incomplete_batches_are_dropped():
    ds = FakeDataset([50, 31], types=["a", "b"])
    s = sampler(ds, mbs=2, accum=1, ws=4)  # G = 8
    batches = s.global_batches()
    assert s.steps_per_epoch == 50 // 8 + 31 // 8 == len(batches)
    kinds = [set(ds.source_type[0 if i < 50 else 1] for i in b) for b in batches.tolist()]
    assert all(len(k) == 1 for k in kinds)
    assert sum(k == {0} for k in kinds) == 6 and sum(k == {1} for k in kinds) == 3
    assert len(set(batches.ravel().tolist())) == batches.size  # ratio 1: no item twice


def test_ratio_draws_int_len_times_ratio_items_and_repeats_above_one():
    ds = FakeDataset([40, 20, 10], types=["a", "a", "a"], ratios=[0.25, 2.5, 0.0])
    s = sampler(ds, mbs=1, accum=1)  # G = 1: nothing dropped, the draw is visible as is
    seen = [Counter(), Counter()]
    for epoch in range(3):
        s.set_epoch(epoch)
        items = np.concatenate(s.global_batches())
        assert ((items >= 0) & (items < 40)).sum() == int(40 * 0.25)
        assert ((items >= 40) & (items < 60)).sum() == int(20 * 2.5)
        assert not (items >= 60).any()  # ratio 0 switches a source off
        c = Counter(items.tolist())
        assert sorted(set(c[i] for i in range(40, 60))) == [2, 3]  # floor(2.5) or floor(2.5) + 1 times
        assert all(c[i] <= 1 for i in range(40))
        seen[0].update(i for i in range(40) if c[i])
    assert len(seen[0]) > 10  # below 1, a fresh subset each epoch


def test_length_clustering_puts_similar_lengths_in_a_global_batch():
    ds = FakeDataset([4000])
    def spread(clustering):
        b = sampler(ds, mbs=4, accum=1, ws=4, clustering=clustering).global_batches()
        L = ds.lengths[b]
        return float(np.mean(L.max(1) - L.min(1)))
    assert spread(True) < 0.05 * spread(False)
    b = sampler(ds, mbs=4, accum=1, ws=4).global_batches()
    means = ds.lengths[b].mean(1)
    assert not (np.diff(means) >= 0).all()  # batch order is shuffled, not short-to-long


@pytest.mark.parametrize("clustering", [True, False])
def test_rank_micro_batches_concatenate_to_the_global_batch(clustering):
    ds = FakeDataset([90, 45], types=["a", "b"])
    glob = sampler(ds, mbs=3, accum=2, ws=2, clustering=clustering).global_batches().tolist()
    assert ranks_steps(ds, ws=2, mbs=3, accum=2, clustering=clustering) == glob
    r1 = iter(sampler(ds, mbs=3, accum=2, ws=2, rank=1, clustering=clustering))
    assert [next(r1), next(r1)] == [glob[0][6:9], glob[0][9:12]]


def test_global_batch_sequence_does_not_depend_on_world_size():
    ds = FakeDataset([120, 70], types=["a", "b"])
    ref = sampler(ds, mbs=1, accum=8, ws=1).global_batches().tolist()
    assert ranks_steps(ds, ws=2, mbs=4, accum=1) == ref
    assert ranks_steps(ds, ws=4, mbs=1, accum=2) == ref


@pytest.mark.parametrize("ws", [1, 2])
def test_resume_mid_epoch_sees_exactly_the_remaining_batches(ws):
    ds = FakeDataset([101, 57], types=["a", "b"])
    full = ranks_steps(ds, ws=ws, mbs=2, accum=2)
    firsts, states = [], []
    for r in range(ws):
        s = sampler(ds, mbs=2, accum=2, ws=ws, rank=r)
        firsts.append(steps(s, 5))
        states.append(s.state_dict())
    assert all(st == states[0] for st in states) and states[0]["step"] == 5
    rest = []
    for r in range(ws):
        s = sampler(ds, mbs=2, accum=2, ws=ws, rank=r)
        s.load_state_dict(states[r])
        s.set_epoch(0)  # the trainer's loop calls this; the same epoch keeps the restored step
        rest.append(steps(s))
    got = [sum((part[k] for part in firsts), []) for k in range(5)]
    got += [sum((part[k] for part in rest), []) for k in range(len(rest[0]))]
    assert got == full


def test_resume_with_another_world_size_and_same_global_batch():
    ds = FakeDataset([150, 66], types=["a", "b"])
    full = ranks_steps(ds, ws=2, mbs=2, accum=2)  # G = 8
    s = sampler(ds, mbs=2, accum=2, ws=2, rank=0)
    steps(s, 7)
    state = s.state_dict()
    resumed = []
    for r in range(4):  # 4 ranks, micro-batch 2, accum 1: G = 8
        t = sampler(ds, mbs=2, accum=1, ws=4, rank=r)
        t.load_state_dict(state)
        resumed.append(steps(t))
    assert [sum((p[k] for p in resumed), []) for k in range(len(resumed[0]))] == full[7:]


def test_global_batch_size_change_replays_nothing_and_skips_only_the_new_remainder():
    ds = FakeDataset([203, 97], types=["a", "b"])
    s = sampler(ds, mbs=4, accum=2, ws=1)  # G = 8
    before = steps(s, 9)
    state = s.state_dict()
    t = sampler(ds, mbs=3, accum=2, ws=1)  # G = 6
    t.load_state_dict(state)
    after = steps(t, 4)
    state2 = t.state_dict()
    assert state2["segments"] == [[8, 9]] and state2["step"] == 13
    u = sampler(ds, mbs=5, accum=1, ws=1)  # G = 5, a second change in the same epoch
    u.load_state_dict(state2)
    rest = steps(u)
    used = [i for b in before + after + rest for i in b]
    assert len(used) == len(set(used))  # nothing replayed (ratio 1: each item once)
    left = {0: 203, 1: 97}
    for i in used:
        left[0 if i < 203 else 1] -= 1
    assert all(0 <= n < 5 for n in left.values())  # only the final remainder (< G per type) is missed
    assert all(len({0 if i < 203 else 1 for i in b}) == 1 for b in after + rest)
    assert u.steps_per_epoch == 13 + len(rest) and u.step == u.steps_per_epoch
    v = sampler(ds, mbs=5, accum=1, ws=1)  # the same resume again gives the same batches
    v.load_state_dict(state2)
    assert steps(v) == rest
    v.set_epoch(1)
    assert v.state_dict()["segments"] == [] and steps(v) == steps(_epoch(sampler(ds, mbs=5, accum=1), 1))


def _epoch(s, e):
    s.set_epoch(e)
    return s


def test_set_epoch_resets_the_step_only_for_a_new_epoch():
    ds = FakeDataset([64])
    s = sampler(ds)
    steps(s, 3)
    s.set_epoch(0)
    assert s.step == 3
    s.set_epoch(1)
    assert (s.epoch, s.step) == (1, 0)
    assert len(steps(s)) == s.steps_per_epoch == 64 // 4
    assert steps(s) == []  # a fully consumed epoch yields nothing until set_epoch(epoch + 1)


def test_bad_arguments_are_refused():
    ds = FakeDataset([10])
    with pytest.raises(ValueError, match="rank"):
        sampler(ds, ws=2, rank=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        sampler(ds, mbs=0)


def _write_data(tmp_path: Path, n=90):
    rng = np.random.default_rng(0)
    rec = tmp_path / record_name(0, 1)
    with ShardWriter(tmp_path / shard_name(0, 1)) as w, open(rec, "w") as f:
        for i in range(n):
            k = int(rng.integers(2, 40))
            f.write(Record(i, shard_name(0, 1), k, w.append(1000 * i + np.arange(k), np.arange(k))).to_json() + "\n")
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"META:\n  - path: {rec.name}\n    type: a\n  - path: {rec.name}\n    type: b\n    ratio: 0.5\n")
    return cfg


@pytest.mark.parametrize("packing", [False, True])
def test_loader_state_counts_received_batches_not_prefetched_ones(tmp_path, packing):
    cfg = _write_data(tmp_path)
    kw = dict(max_seq_len=32, micro_batch_size=2, accum_iter=2, world_size=2, rank=1, seed=3,
              length_clustering=True, packing=packing, pin_mem=True, pad_id=0)
    full = [b["input_ids"] for b in build_train_data(cfg, num_workers=0, **kw).loader]
    data = build_train_data(cfg, num_workers=2, **kw)  # workers prefetch ahead of what we take
    taken = []
    for b in data.loader:
        taken.append(b["input_ids"])
        if len(taken) == 6:
            state = data.sampler.state_dict()
            break
    assert state["step"] == 3
    again = build_train_data(cfg, num_workers=1, **kw)
    again.sampler.load_state_dict(state)
    again.sampler.set_epoch(0)
    rng = torch.get_rng_state()
    rest = [b["input_ids"] for b in again.loader]
    assert torch.equal(torch.get_rng_state(), rng)  # the loader leaves the global RNG (dropout) alone
    assert len(taken) + len(rest) == len(full) == again.sampler.steps_per_epoch * 2
    for a, b in zip(taken + rest, full):
        assert torch.equal(a, b)


def test_type_of_step_reads_the_plan_without_moving_the_position_or_the_order():
    ds = FakeDataset([50, 30], types=["a", "b"])
    s, fresh = sampler(ds), sampler(ds)
    for x in (s, fresh):
        x.set_epoch(1)
    plan = s.global_batches()
    types = [s.type_of_step(k) for k in range(s.steps_per_epoch)]
    assert types == [0 if b[0] < 50 else 1 for b in plan.tolist()] and set(types) == {0, 1}
    assert s.step == 0 and steps(s) == steps(fresh)
    with pytest.raises(IndexError, match="no global batch"):
        s.type_of_step(s.steps_per_epoch)
