"""collate: padding, truncation, packing; and packed attention that never crosses items (tiny Chameleon)."""

import numpy as np
import pytest
import torch

from data.collate import collate, padding_waste, padding_waste_of_lengths
from data.packing import block_causal_mask, pack_rows, to_additive_mask


def item(tokens, labels=None):
    t = np.asarray(tokens, dtype=np.int64)
    return {"input_ids": t, "labels": t.copy() if labels is None else np.asarray(labels, dtype=np.int64)}


def test_pads_to_longest_and_truncates_to_max_seq_len():
    b = collate([item([5, 6, 7]), item(range(10, 20))], max_seq_len=6, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [10, 11, 12, 13, 14, 15]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100, -100], [-100, 11, 12, 13, 14, 15]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0, 0], list(range(6))]
    assert b["doc_ids"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert int(b["n_real_tokens"]) == 9 and int(b["n_items"]) == 2
    assert padding_waste(b) == pytest.approx(3 / 12)
    assert all(v.dtype == torch.int64 for v in b.values())
    fixed = collate([item([5, 6, 7])], max_seq_len=6, pad_id=0, pad_to_max_len=True)
    assert fixed["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0]]


def test_pack_rows_is_first_fit_in_the_given_order():
    # 5 -> row0 (3 left); 4 -> row1 (4 left); 3 -> row0 (0 left); 9 (as 8) -> row2; 1 -> row1; 2 -> row1
    assert pack_rows([5, 4, 3, 9, 1, 2], 8) == [[0, 2], [1, 4, 5], [3]]


def test_packing_restarts_positions_and_never_trains_across_items():
    b = collate([item([1, 2, 3]), item([4, 5, 6, 7, 8, 9, 10]), item([11, 12])], max_seq_len=6, pad_id=0,
                packing=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 11, 12, 0], [4, 5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert b["doc_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1] * 6]
    # The first label of every item is ignored: a shifted loss would otherwise predict 11 from 3.
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 12, -100], [-100, 5, 6, 7, 8, 9]]
    assert int(b["n_real_tokens"]) == 11 and int(b["n_items"]) == 3


def test_padding_waste_from_lengths_matches_collated_batches():
    rng = np.random.default_rng(0)
    mbs = [rng.integers(1, 40, size=4).tolist() for _ in range(20)]
    for packing in (False, True):
        batches = [collate([item(np.arange(n) + 1) for n in lens], max_seq_len=32, pad_id=0, packing=packing)
                   for lens in mbs]
        real = sum(int(b["n_real_tokens"]) for b in batches)
        slots = sum(b["input_ids"].numel() for b in batches)
        assert padding_waste_of_lengths(mbs, 32, packing=packing) == pytest.approx(1 - real / slots)


def test_block_causal_mask_allows_only_earlier_tokens_of_the_same_item():
    m = block_causal_mask(torch.tensor([[1, 1, 2, 2, 0]]))
    assert m.shape == (1, 1, 5, 5) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0],
                                      [0, 0, 1, 0, 0],
                                      [0, 0, 1, 1, 0],
                                      [0, 0, 0, 0, 1]]  # padding sees only itself: no all-masked row


# ------------------------------------------------------------------ the packed mask in a real model


@pytest.fixture(scope="module")
def tiny_chameleon():
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab_map = {"<image>": 299, **{f"IMGIMG{c}Z": 200 + i for i, c in enumerate("ABCDEFGHIJ")}}
    cfg = ChameleonConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                          vocabulary_map=vocab_map)
    torch.manual_seed(0)
    return ChameleonForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def packed():
    g = torch.Generator().manual_seed(1)
    items = [item(torch.randint(1, 199, (n,), generator=g).numpy()) for n in (5, 9, 3, 7)]
    return items, collate(items, max_seq_len=16, pad_id=0, packing=True, pad_to_max_len=True)


def _alone(model, items):
    with torch.no_grad():
        return [model(input_ids=torch.as_tensor(it["input_ids"])[None], use_cache=False).logits[0] for it in items]


def _per_item(logits, batch):
    """Logits of each packed item, in item order (rows, then position in row)."""
    out = []
    for b in range(batch["doc_ids"].shape[0]):
        for d in range(1, int(batch["doc_ids"][b].max()) + 1):
            out.append(logits[b][batch["doc_ids"][b] == d])
    return out


def _order(batch, items):
    """Items in the packed order (rows, then position), to compare with _per_item."""
    rows = pack_rows([len(it["input_ids"]) for it in items], batch["input_ids"].shape[1])
    return [items[i] for r in rows for i in r]


def _set_attn(model, impl):
    model.config._attn_implementation = impl


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_gives_the_logits_of_each_item_alone(tiny_chameleon, packed, impl):
    items, batch = packed
    assert batch["input_ids"].shape[0] < len(items)  # really packed
    mask = block_causal_mask(batch["doc_ids"])
    if impl == "eager":  # eager adds the mask to the scores: it needs the additive form
        mask = to_additive_mask(mask, torch.float32)
    _set_attn(tiny_chameleon, impl)
    try:
        with torch.no_grad():
            logits = tiny_chameleon(input_ids=batch["input_ids"], attention_mask=mask,
                                    position_ids=batch["position_ids"], use_cache=False).logits
    finally:
        _set_attn(tiny_chameleon, "sdpa")
    assert torch.isfinite(logits).all()
    ordered = _order(batch, items)
    for got, want in zip(_per_item(logits, batch), _alone(tiny_chameleon, ordered), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_comparison_detects_attention_leaking_across_items(tiny_chameleon, packed):
    """Guards the test above: with plain causal attention over the packed row the logits differ."""
    items, batch = packed
    with torch.no_grad():
        leaky = tiny_chameleon(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
    diffs = [float((g - w).abs().max()) for g, w in zip(_per_item(leaky, batch),
                                                       _alone(tiny_chameleon, _order(batch, items)))]
    assert max(diffs) > 1e-3


def test_position_ids_alone_also_isolate_packed_items(tiny_chameleon, packed):
    """The documented alternative (e.g. for flash attention): no mask, transformers infers the packing."""
    items, batch = packed
    with torch.no_grad():
        logits = tiny_chameleon(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False).logits
    for got, want in zip(_per_item(logits, batch), _alone(tiny_chameleon, _order(batch, items))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_padded_unpacked_batch_gives_the_logits_of_each_item_alone(tiny_chameleon, packed):
    items, _ = packed
    batch = collate(items, max_seq_len=16, pad_id=0)
    with torch.no_grad():
        logits = tiny_chameleon(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"], use_cache=False).logits
    for got, want in zip(_per_item(logits, batch), _alone(tiny_chameleon, items)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
