"""The Chameleon tokenizer bundle: loading, id layout, code<->BPE mapping, VQGAN encode/decode, errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from model.tokenizer import vqgan as vqgan_module
from model.tokenizer.tiny_bundle import TINY_VQGAN, code_name, main as make_tiny_bundle_main
from model.tokenizer.bundle import BUNDLE_FILES, BundleError, ChameleonTokenizer, code_from_name
from model.tokenizer.vqgan import VQGAN, VQGANConfig, VectorQuantizer, count_parameters


def _rand_pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _copy_bundle(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE_FILES:
        shutil.copyfile(src / name, dst / name)
    return dst


# ------------------------------------------------------------------------------------- id layout


def test_tiny_bundle_has_chameleon_id_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab["<unk>"] == 3
    assert tok.image_token_ids == list(range(4, 8196))
    assert tok.vocab["IMGIMGAZ"] == 4 and tok.vocab["IMGIMGBCDZ"] == 4 + 123
    assert (tok.eoi_id, tok.boi_id) == (8196, 8197)
    assert tok.eot_id == 8706 + 4 and tok.eol_id == 8799 + 4
    for n in range(8194, 9000):
        assert tok.vocab[f"<reserved{n:05d}>"] == n + 4
    assert tok.size_token_id(16) == 8816 + 4 and tok.size_token_id(64) == 8864 + 4
    text_ids = [i for t, i in tok.vocab.items() if not t.startswith(("<", "IMGIMG"))]
    assert min(text_ids) == 9004 and tok.vocab_size == max(tok.vocab.values()) + 1
    assert "<|image|>" not in tok.vocab


def test_code_names_map_digits_to_letters_both_ways():
    assert code_name(0) == "IMGIMGAZ" and code_name(123) == "IMGIMGBCDZ" and code_name(8191) == "IMGIMGIBJBZ"
    assert all(code_from_name(code_name(c)) == c for c in range(8192))
    assert code_from_name("<reserved08706>") is None and code_from_name("IMGIMG") is None


def test_code_bpe_round_trip_keeps_container_type(tiny_tokenizer):
    tok = tiny_tokenizer
    codes = torch.randint(0, 8192, (3, 5), generator=torch.Generator().manual_seed(0))
    ids = tok.codes_to_bpe(codes)
    assert isinstance(ids, torch.Tensor) and torch.equal(ids, codes + 4)
    assert torch.equal(tok.bpe_to_codes(ids), codes)
    arr = codes.numpy()
    assert np.array_equal(tok.bpe_to_codes(tok.codes_to_bpe(arr)), arr)
    assert tok.bpe_to_codes(tok.codes_to_bpe([0, 8191, 77])) == [0, 8191, 77]
    assert tok.codes_to_bpe(123) == 127 and tok.bpe_to_codes(127) == 123
    assert tok.is_image_token(ids).all() and not tok.is_image_token(tok.boi_id)
    assert tok.is_image_token(np.array([3, 4, 8195, 8196, -5, 10 ** 6])).tolist() == [False, True, True, False,
                                                                                      False, False]
    with pytest.raises(ValueError, match="8196 is not an image token"):
        tok.bpe_to_codes([4, 8196])
    with pytest.raises(ValueError, match=r"\[0, 8192\)"):
        tok.codes_to_bpe(np.array([8192]))


def test_text_encoding_keeps_spaces_and_adds_no_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    left, right = "a <|image|> b".split("<|image|>")
    assert tok.decode_text(tok.encode_text(left)) == "a " and tok.decode_text(tok.encode_text(right)) == " b"
    text = "Hello world, this is a test of 42 words.\nNew line!"
    ids = tok.encode_text(text)
    assert ids[0] != tok.bos_id and tok.decode_text(ids) == text
    # The file's own post-processor prepends <s> (as Meta's does); encode_text must not.
    assert tok.text_tokenizer.encode(text).ids == [tok.bos_id] + ids
    assert tok.encode_text("x<reserved08706>y") == tok.encode_text("x") + [tok.eot_id] + tok.encode_text("y")
    # Image codes are plain vocabulary entries: text spelling one stays text.
    assert not tok.is_image_token(np.array(tok.encode_text("IMGIMGAZ"))).any()


# ---------------------------------------------------------------------------------- image blocks


def test_512px_image_block_has_1060_tokens_in_exact_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    codes = np.arange(32 * 32).reshape(32, 32)
    block = tok.image_block(codes)
    assert len(block) == 1060 == tok.image_block_len(512, 512)
    assert block[:3] == [tok.boi_id, tok.vocab["<reserved08816>"], tok.vocab["<reserved08816>"]]
    assert block[-1] == tok.eoi_id
    rows = np.array(block[3:-1]).reshape(32, 33)
    assert (rows[:, -1] == tok.eol_id).all()
    assert np.array_equal(rows[:, :-1], codes + 4)
    assert np.array_equal(tok.parse_image_block(block), codes)


def test_image_block_puts_height_size_token_first(tiny_tokenizer):
    tok = tiny_tokenizer
    codes = np.zeros((24, 42), dtype=np.int64)  # a 384 x 672 (H x W) image
    block = tok.image_block(codes)
    assert block[1:3] == [tok.size_token_id(12), tok.size_token_id(21)]
    assert len(block) == tok.image_block_len(384, 672) == 3 + 24 * 43 + 1
    assert tok.parse_image_block(block).shape == (24, 42)
    assert tok.find_image_blocks([5, *block, 7, *block]) == [(1, 1 + len(block)), (2 + len(block), 2 + 2 * len(block))]


def test_parse_image_block_rejects_a_broken_block(tiny_tokenizer):
    tok = tiny_tokenizer
    block = tok.image_block(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="needs 6 tokens"):
        tok.parse_image_block(block[:-2] + [tok.eoi_id])
    broken = list(block)
    broken[5] = 9999  # the first row's <reserved08799>
    with pytest.raises(ValueError, match="row 0"):
        tok.parse_image_block(broken)


# ------------------------------------------------------------------------------------------ VQGAN


def test_saved_and_reloaded_bundle_encodes_identically(tiny_bundle, tiny_tokenizer):
    again = ChameleonTokenizer.from_bundle(tiny_bundle)
    x = _rand_pixels(2, 3, 64, 96)
    assert torch.equal(again.encode_images(x), tiny_tokenizer.encode_images(x))
    assert again.encode_text("A red square, 42 of them.") == tiny_tokenizer.encode_text("A red square, 42 of them.")
    codes = torch.randint(0, 8192, (1, 4, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.decode_codes(codes), tiny_tokenizer.decode_codes(codes))


def test_same_seed_writes_byte_identical_bundle(tiny_bundle, tmp_path):
    make_tiny_bundle_main(["--out", str(tmp_path / "again"), "--seed", "0"])
    for name in BUNDLE_FILES:
        a, b = (tiny_bundle / name).read_bytes(), (tmp_path / "again" / name).read_bytes()
        assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest(), name


def test_codes_vary_and_decode_gives_pixels_in_range(tiny_tokenizer):
    tok = tiny_tokenizer
    x = _rand_pixels(3, 3, 64, 64)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    x[1] = torch.stack([xx, yy, xx * yy])
    codes = tok.encode_images(x)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert all(len(torch.unique(c)) >= 6 for c in codes)  # of 16 positions
    assert not torch.equal(codes[0], codes[1])
    pixels = tok.decode_codes(codes)
    assert pixels.shape == (3, 3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_batched_list_and_single_encoding_agree(tiny_tokenizer):
    tok = tiny_tokenizer
    a, b, c = _rand_pixels(3, 32, 64, seed=1), _rand_pixels(3, 64, 32, seed=2), _rand_pixels(3, 32, 64, seed=3)
    listed = tok.encode_images([a.numpy(), b.numpy(), c])
    assert [t.shape for t in listed] == [(2, 4), (4, 2), (2, 4)]
    assert torch.equal(listed[0], tok.encode_images(a)) and torch.equal(listed[1], tok.encode_images(b))
    batched = tok.encode_images(torch.stack([a, c]), batch_size=1)
    assert torch.equal(batched[1], listed[2])


def test_the_vqgan_runs_nchw_by_default_and_channels_last_is_opt_in(tiny_bundle):
    """NCHW is what gives Lumina's codes (tests/test_lumina_golden.py); channels_last changed some there."""
    default = ChameleonTokenizer.from_bundle(tiny_bundle)
    fast = ChameleonTokenizer.from_bundle(tiny_bundle, channels_last=True)
    assert not default.vqgan.channels_last and fast.vqgan.channels_last
    assert default.vqgan.encoder.conv_in.weight.is_contiguous()
    x = _rand_pixels(2, 3, 128, 64, seed=4)
    assert fast.encode_images(x).shape == default.encode_images(x).shape == (2, 8, 4)


def test_quantizer_picks_the_nearest_code_in_chunks(monkeypatch):
    torch.manual_seed(0)
    q = VectorQuantizer(300, 4)
    z = torch.randn(2, 4, 5, 7)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4).double()
    want = torch.cdist(flat, q.embedding.weight.double()).argmin(1).view(2, 5, 7)
    assert torch.equal(q.codes(z), want)
    monkeypatch.setattr(vqgan_module, "QUANTIZE_CHUNK", 8)
    assert torch.equal(q.codes(z), want)
    assert torch.equal(q.embed(want)[0, :, 1, 2], q.embedding.weight[want[0, 1, 2]])


def test_real_size_vqgan_config_has_expected_parameter_count():
    cfg = VQGANConfig.from_dict({"embed_dim": 256, "n_embed": 8192, "ddconfig": {
        "double_z": False, "z_channels": 256, "resolution": 512, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}})
    with torch.device("meta"):  # shapes only: no weights, no download
        model = VQGAN(cfg)
    assert cfg.downsample == 16
    assert count_parameters(model.encoder) == 27_194_880
    assert count_parameters(model.decoder) == 39_294_851
    assert count_parameters(model) == 68_718_467  # + quant convs 2 * 65_792 + codebook 8192 * 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_encoding_matches_cpu(tiny_bundle, tiny_tokenizer):
    gpu = ChameleonTokenizer.from_bundle(tiny_bundle, device="cuda")
    x = _rand_pixels(4, 3, 128, 128, seed=5)
    assert torch.equal(gpu.encode_images(x), tiny_tokenizer.encode_images(x))
    codes = tiny_tokenizer.encode_images(x)
    assert torch.allclose(gpu.decode_codes(codes), tiny_tokenizer.decode_codes(codes), atol=1e-4)


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("missing", BUNDLE_FILES)
def test_missing_bundle_file_names_path_and_bundle_contents(tiny_bundle, tmp_path, missing):
    bundle = _copy_bundle(tiny_bundle, tmp_path / "b")
    (bundle / missing).unlink()
    with pytest.raises(BundleError) as e:
        ChameleonTokenizer.from_bundle(bundle)
    msg = str(e.value)
    assert str(bundle / missing) in msg
    assert all(name in msg for name in BUNDLE_FILES) and "make_tiny_bundle.py --out" in msg


def test_missing_bundle_directory_is_named(tmp_path):
    with pytest.raises(BundleError, match="does not exist.*text_tokenizer.json, vqgan.yaml and vqgan.ckpt"):
        ChameleonTokenizer.from_bundle(tmp_path / "nowhere")


def test_vocabulary_without_special_tokens_is_refused(tiny_bundle, tmp_path):
    bundle = _copy_bundle(tiny_bundle, tmp_path / "b")
    path = bundle / "text_tokenizer.json"
    doc = json.loads(path.read_text())
    for old, new in (("<reserved08799>", "<renamed1>"), ("<eoss>", "<renamed2>")):
        doc["model"]["vocab"][new] = doc["model"]["vocab"].pop(old)
        for t in doc["added_tokens"]:
            if t["content"] == old:
                t["content"] = new
    path.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"lacks the special token\(s\) <eoss>, <reserved08799>"):
        ChameleonTokenizer.from_bundle(bundle, load_vqgan=False)


def test_checkpoint_that_does_not_fit_the_yaml_names_keys_and_shapes(tiny_bundle, tmp_path):
    bundle = _copy_bundle(tiny_bundle, tmp_path / "b")
    doc = TINY_VQGAN.to_yaml_dict()
    doc["model"]["params"]["embed_dim"] = 16
    (bundle / "vqgan.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(BundleError) as e:
        ChameleonTokenizer.from_bundle(bundle)
    msg = str(e.value)
    assert "quantize.embedding.weight: checkpoint (8192, 8) vs vqgan.yaml (8192, 16)" in msg
    assert "quant_conv.weight: checkpoint (8, 16, 1, 1) vs vqgan.yaml (16, 16, 1, 1)" in msg


def test_checkpoint_with_missing_or_extra_keys_is_refused_but_loss_keys_are_ignored(tiny_bundle, tmp_path):
    bundle = _copy_bundle(tiny_bundle, tmp_path / "b")
    sd = torch.load(bundle / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2)  # training-only keys, as in a Lightning ckpt
    torch.save({"state_dict": sd}, bundle / "vqgan.ckpt")
    ChameleonTokenizer.from_bundle(bundle)
    del sd["post_quant_conv.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, bundle / "vqgan.ckpt")
    with pytest.raises(BundleError, match=r"missing: post_quant_conv.bias.*unexpected key\(s\): encoder.extra.weight"):
        ChameleonTokenizer.from_bundle(bundle)


def test_checkpoint_needing_arbitrary_code_is_refused(tiny_bundle, tmp_path):
    bundle = _copy_bundle(tiny_bundle, tmp_path / "b")
    torch.save({"state_dict": {}, "hparams": BundleError("not a tensor")}, bundle / "vqgan.ckpt")
    with pytest.raises(BundleError, match="weights_only=True"):
        ChameleonTokenizer.from_bundle(bundle)


def test_codebook_size_must_match_the_vocabulary(tiny_bundle, tmp_path):
    bundle = _copy_bundle(tiny_bundle, tmp_path / "b")
    doc = TINY_VQGAN.to_yaml_dict()
    doc["model"]["params"]["n_embed"] = 4096
    (bundle / "vqgan.yaml").write_text(yaml.safe_dump(doc))
    sd = torch.load(bundle / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"][:4096].clone()
    torch.save({"state_dict": sd}, bundle / "vqgan.ckpt")
    with pytest.raises(BundleError, match="n_embed=4096, but the vocabulary has 8192 image codes"):
        ChameleonTokenizer.from_bundle(bundle)


def test_text_only_tokenizer_explains_that_images_need_the_vqgan(tiny_tokenizer):
    text = tiny_tokenizer.text_only()
    assert text.encode_text("hi there") == tiny_tokenizer.encode_text("hi there")
    with pytest.raises(BundleError, match="without its VQGAN"):
        text.encode_images(torch.zeros(1, 3, 32, 32))


def test_bad_yaml_is_named(tmp_path):
    p = tmp_path / "vqgan.yaml"
    p.write_text("model:\n  params:\n    embed_dim: 8\n")
    with pytest.raises(BundleError, match=r"vqgan.yaml: model.params lacks n_embed, ddconfig"):
        VQGANConfig.from_yaml(p)
    doc = TINY_VQGAN.to_yaml_dict()
    doc["model"]["params"]["ddconfig"]["ch"] = 48
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(BundleError, match="multiples of 32"):
        VQGANConfig.from_yaml(p)
