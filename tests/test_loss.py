"""The trainer's loss (model/chameleon_lm.py): chunked head + CE + z-loss + image-logit masking, and dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from model.chameleon_lm import ChameleonLM, LMHeadWithLoss, image_token_ids, naive_lm_loss

V, H = 300, 16
IMAGE_IDS = torch.arange(100, 200)


def _batch(seed=0, B=2, L=40):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :5] = -100
    labels[1, 30:] = -100
    labels[0, 10:20] = torch.randint(100, 200, (10,), generator=g)  # labelled image codes
    weight = torch.randn(V, H, generator=g) * 0.5
    return hidden, labels, weight


def _head(weight, **kw):
    head = LMHeadWithLoss(H, V, image_ids=kw.pop("image_ids", IMAGE_IDS), **kw)
    head.weight = torch.nn.Parameter(weight.clone())
    return head


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("z_w", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_and_grads_equal_full_logits_computation(mask, z_w, chunk):
    hidden, labels, weight = _batch()
    h1 = hidden.clone().requires_grad_()
    head = _head(weight, mask_image_logits=mask, z_loss_weight=z_w, chunk_size=chunk)
    out = head(h1, labels, loss_scale=0.25)
    out.loss.backward()

    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    ref = naive_lm_loss(h2 @ w2.t(), labels, image_ids=IMAGE_IDS, mask_image_logits=mask, z_loss_weight=z_w)
    (ref.loss * 0.25).backward()

    assert int(out.n_tokens) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(out.loss, ref.loss * 0.25, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.ce_sum, ref.ce_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.z_sum, ref.z_sum, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_unmasked_closs_is_plain_cross_entropy_and_z_loss_is_mean_lse_squared():
    hidden, labels, weight = _batch(1)
    head = _head(weight, mask_image_logits=False, z_loss_weight=0.0)
    out = head(hidden, labels)
    logits = (hidden @ weight.t())[:, :-1].reshape(-1, V)
    tgt = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits, tgt, ignore_index=-100)
    lse = torch.logsumexp(logits[tgt != -100], dim=1)
    torch.testing.assert_close(out.ce_sum / out.n_tokens, ce)
    torch.testing.assert_close(out.z_sum / out.n_tokens, lse.square().mean())


def test_masking_removes_image_codes_only_where_the_target_is_text():
    hidden, labels, weight = _batch(2)
    head = _head(weight, mask_image_logits=True, z_loss_weight=0.0)
    out = head(hidden, labels)
    assert math.isfinite(float(out.ce_sum)), "labelled image codes must keep a finite loss"
    logits = (hidden @ weight.t())[:, :-1].reshape(-1, V)
    tgt = labels[:, 1:].reshape(-1)
    keep = tgt != -100
    logits, tgt = logits[keep], tgt[keep]
    is_img = torch.isin(tgt, IMAGE_IDS)
    text_cols = torch.ones(V, dtype=torch.bool)
    text_cols[IMAGE_IDS] = False
    # text targets: softmax over the non-image vocabulary only
    text_logits = logits[~is_img][:, text_cols]
    remap = torch.cumsum(text_cols.long(), 0) - 1
    ce_text = F.cross_entropy(text_logits, remap[tgt[~is_img]], reduction="sum")
    # image targets: the whole vocabulary
    ce_img = F.cross_entropy(logits[is_img], tgt[is_img], reduction="sum")
    torch.testing.assert_close(out.ce_sum, ce_text + ce_img, rtol=1e-5, atol=1e-3)
    assert is_img.any() and (~is_img).any()


def test_transformers_builtin_loss_is_unusable_for_image_targets():
    """The reason the trainer computes its own loss: HF masks image logits before its loss."""
    vm = {f"t{i}": i for i in range(64)} | {"<image>": 63}
    vm |= {f"IMGIMG{chr(65 + i)}Z": 64 + i for i in range(8)}
    cfg = ChameleonConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, vocabulary_map=vm,
                          vq_config=dict(embed_dim=32, num_embeddings=8, latent_channels=32, base_channels=32,
                                         channel_multiplier=[1], resolution=16, attn_resolutions=[]))
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1, 2, 64, 65, 66, 3]])
    loss_hf = hf(input_ids=ids, labels=ids, use_cache=False).loss.detach()
    assert not math.isfinite(float(loss_hf)) or float(loss_hf) > 1e30
    lm = ChameleonLM(hf, mask_image_logits=True)
    assert list(image_token_ids(cfg)) == list(range(64, 72))
    out = lm(ids, ids)
    assert math.isfinite(float(out.loss.detach())) and float(out.loss.detach()) < 1e3


def test_bf16_weights_give_bf16_grads_close_to_fp32():
    hidden, labels, weight = _batch(3)
    head32 = _head(weight, mask_image_logits=True, z_loss_weight=1e-3, chunk_size=16)
    head16 = _head(weight.bfloat16(), mask_image_logits=True, z_loss_weight=1e-3, chunk_size=16)
    o32 = head32(hidden, labels)
    o16 = head16(hidden.bfloat16(), labels)
    o32.loss.backward()
    o16.loss.backward()
    assert head16.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(o16.ce_sum, o32.ce_sum, rtol=2e-2, atol=0.5)
    torch.testing.assert_close(head16.weight.grad.float(), head32.weight.grad, rtol=0.05, atol=0.05)


def _tiny_hf(swin_norm=False):
    vm = {f"t{i}": i for i in range(64)} | {"<image>": 63}
    cfg = ChameleonConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, vocabulary_map=vm, swin_norm=swin_norm,
                          vq_config=dict(embed_dim=32, num_embeddings=8, latent_channels=32, base_channels=32,
                                         channel_multiplier=[1], resolution=16, attn_resolutions=[]))
    torch.manual_seed(0)
    return ChameleonForConditionalGeneration(cfg)


@pytest.mark.parametrize("swin_norm", [False, True])
def test_residual_dropout_is_active_in_train_mode_only_and_replays_with_the_seed(swin_norm):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _tiny_hf(swin_norm).eval()
    with torch.no_grad():
        ref_logits = ref.lm_head(ref.model(input_ids=ids, use_cache=False).last_hidden_state)
    lm = ChameleonLM(_tiny_hf(swin_norm), dropout=0.3)
    assert len(lm.dropout_handles) == 4  # two sublayers x two layers
    assert not hasattr(lm.model, "vqmodel")
    torch.testing.assert_close(lm.eval().logits(ids), ref_logits)  # eval: no dropout, same as transformers
    lm.train()
    torch.manual_seed(5)
    a = lm(ids, ids).ce_sum
    torch.manual_seed(5)
    b = lm(ids, ids).ce_sum
    torch.manual_seed(6)
    c = lm(ids, ids).ce_sum
    assert float(a) == float(b) and float(a) != float(c)
    for h in lm.dropout_handles:
        h.remove()
    torch.testing.assert_close(lm.logits(ids), ref_logits)
