"""The Chameleon tokenizer bundle: loading, id layout, code<->BPE mapping, VQGAN encode/decode, errors."""

from __future__ import annotations

import torch

from model.tokenizer_bundle import ChameleonTokenizer


def test_tiny_bundle_has_chameleon_id_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab["<unk>"] == 3
    assert tok.image_token_ids == list(range(4, 8196))
    assert tok.vocab["IMGIMGAZ"] == 4 and tok.vocab["IMGIMGBCDZ"] == 4 + 123
    assert (tok.eoi_id, tok.boi_id) == (8196, 8197)
    assert tok.eot_id == 8706 + 4 and tok.eol_id == 8799 + 4
    assert tok.size_token_id(64) == 8864 + 4


def test_saved_and_reloaded_bundle_encodes_identically(tiny_bundle, tiny_tokenizer):
    again = ChameleonTokenizer.from_bundle(tiny_bundle)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(again.encode_images(x), tiny_tokenizer.encode_images(x))
    assert again.encode_text("A red square, 42 of them.") == tiny_tokenizer.encode_text("A red square, 42 of them.")
