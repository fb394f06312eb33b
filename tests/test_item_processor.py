"""Item processing per DESIGN "One training sequence": layout, labels, <|image|> rules, preprocessing, errors."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from data.image_preprocess import (ImageLoadError, center_crop, choose_crop, crop_sizes, load_image,
                                   preprocess_image, to_pil, to_rgb_array)
from data.item_processor import IGNORE_INDEX, ItemError, ItemProcessor

EOT = "<reserved08706>"


@pytest.fixture(scope="module")
def proc(tiny_tokenizer):
    return ItemProcessor(tiny_tokenizer, target_size=256)


def _png(path, size=(64, 48), color=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def _gradient(w, h, mode="RGB"):
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    arr = np.stack([x, y, (x + y) / 2], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _conv(*turns, image=None):
    roles = ["human", "gpt"]
    item = {"conversations": [{"from": roles[i % 2], "value": v} for i, v in enumerate(turns)]}
    if image is not None:
        item["image"] = image
    return item


# ------------------------------------------------------------------------------------- crop sizes


def test_crop_size_lists_have_49_73_97_sizes():
    assert [len(crop_sizes(t)) for t in (512, 768, 1024)] == [49, 73, 97]


@pytest.mark.parametrize("target", [512, 768, 1024])
def test_crop_sizes_walk_the_32px_grid_boundary_within_aspect_4(target):
    # Lumina's list: from (N, 1) patches, grow the height while w*h <= N, else shrink the width; keep the
    # states with aspect <= 4. (So it is not only the Pareto-maximal sizes: 49 entries for 512, not 17.)
    n = (target // 32) ** 2
    sizes = crop_sizes(target)
    assert sizes[0] == (target * 2, target // 2) and sizes[-1] == (target // 2, target * 2)
    patches = [(w // 32, h // 32) for w, h in sizes]
    for (w, h), (cw, ch) in zip(patches, sizes):
        assert cw % 32 == 0 and ch % 32 == 0 and w * h <= n and max(w, h) / min(w, h) <= 4
    for (w, h), nxt in zip(patches, patches[1:]):
        assert nxt == ((w, h + 1) if w * (h + 1) <= n else (w - 1, h))
    assert (target, target) in sizes


def test_crop_choice_follows_the_aspect_score_and_prefers_larger_on_ties():
    sizes = crop_sizes(512)
    assert choose_crop(1000, 1000, sizes) == (512, 512)
    assert choose_crop(2000, 1000, sizes) == (704, 352)
    assert choose_crop(1000, 2000, sizes) == (352, 704)
    assert choose_crop(100, 10000, sizes) == (256, 1024)  # beyond 1:4 the most extreme size
    # Equal scores resolve like Lumina's sorted(..., reverse=True)[0]: the larger (w, h) wins.
    assert choose_crop(10, 10, [(32, 32), (64, 64)]) == (64, 64)


# ---------------------------------------------------------------------------------- preprocessing


def test_box_halving_then_bicubic_cover_then_centre_crop():
    img = _gradient(1100, 530)
    crop = choose_crop(1100, 530, crop_sizes(256))
    assert crop == (320, 160)
    # 1100x530 -> BOX 550x265 (both sides >= 2x crop) -> not again (550 < 640) -> BICUBIC to cover
    # 320x160: scale max(320/550, 160/265) -> 332x160 -> centre columns 6..325
    want = img.resize((550, 265), Image.Resampling.BOX).resize((332, 160), Image.Resampling.BICUBIC)
    want = np.asarray(want)[:, 6:326, :]
    got = preprocess_image(img, 256)
    assert got.shape == (3, 160, 320) and got.dtype == np.float32
    assert np.array_equal(got, ((want / 255.0) * 2 - 1).astype(np.float32).transpose(2, 0, 1))
    assert np.array_equal(np.asarray(center_crop(img, crop)), want)


def test_pixels_scale_from_0_255_to_minus_one_one():
    pixels = preprocess_image(Image.new("RGB", (64, 64), (0, 255, 51)), 256)
    assert pixels.shape == (3, 256, 256)
    assert np.all(pixels[0] == -1.0) and np.all(pixels[1] == 1.0)
    assert np.all(pixels[2] == np.float32((51 / 255.0) * 2 - 1))
    assert np.array_equal(np.asarray(to_pil(pixels)), np.asarray(Image.new("RGB", (256, 256), (0, 255, 51))))


def test_rgba_is_composited_on_white_with_truncation():
    arr = np.zeros((32, 96, 4), dtype=np.uint8)
    arr[:, :32] = (0, 0, 0, 0)          # fully transparent black -> white
    arr[:, 32:64] = (10, 20, 30, 255)   # opaque -> unchanged
    arr[:, 64:] = (0, 0, 0, 43)         # (1 - 43/255) * 255 = 211.99999999999997 -> 211, not 212
    pixels = preprocess_image(Image.fromarray(arr, "RGBA"), 256)  # 3:1 -> 384x128, a 4x upscale
    rgb = np.round((pixels.transpose(1, 2, 0) + 1) / 2 * 255).astype(int)
    assert rgb.shape == (128, 384, 3)
    assert (rgb[:, :128 - 12] == 255).all()  # away from the resampled seams
    assert (rgb[:, 128 + 12: 256 - 12] == (10, 20, 30)).all()
    assert (rgb[:, 256 + 12:] == 211).all()


def test_opaque_rgba_and_grayscale_match_rgb(tmp_path):
    img = _gradient(80, 60)
    rgb = preprocess_image(img, 256)
    assert np.array_equal(preprocess_image(img.convert("RGBA"), 256), rgb)
    gray = img.convert("L")
    assert np.array_equal(preprocess_image(gray, 256), preprocess_image(gray.convert("RGB"), 256))


def test_exif_orientation_is_applied(tmp_path):
    img = _gradient(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (32, 64)


def test_palette_16bit_cmyk_and_1bit_modes_become_rgb_like(tmp_path):
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1
    pal.putpixel((0, 0), 1)
    path = tmp_path / "pal.png"
    pal.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGBA" and loaded.getpixel((0, 0))[3] == 0 and loaded.getpixel((1, 1)) == (255, 0, 0, 255)

    deep = Image.fromarray(np.array([[0, 32896, 65535, 257]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    buf = io.BytesIO()
    deep.save(buf, "PNG")
    loaded = load_image(buf.getvalue())
    assert loaded.mode == "L" and np.asarray(loaded).tolist() == [[0, 128, 255, 1]]

    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    loaded = load_image(_save(cmyk, tmp_path / "c.jpg"))  # resized as CMYK, as Lumina does; RGB at the end
    assert loaded.mode == "CMYK" and to_rgb_array(loaded).shape == (8, 8, 3)
    one = Image.new("1", (8, 8), 1)
    assert load_image(_save(one, tmp_path / "one.png")).getpixel((0, 0)) == (255, 255, 255)


def _save(img, path):
    img.save(path)
    return path


# ---------------------------------------------------------------------------------- the sequence


def test_text_turns_bos_once_no_eos_and_labels_only_on_assistant_turns(proc, tiny_tokenizer):
    tok = tiny_tokenizer
    item = _conv("Hi there.", "Hello! How can I help?", "Tell me a story.", "Once upon a time.")
    tokens, labels = proc.process_item(item)
    turns = [tok.encode_text(v + EOT) for v in ("Hi there.", "Hello! How can I help?", "Tell me a story.",
                                                 "Once upon a time.")]
    assert tokens == [tok.bos_id] + turns[0] + turns[1] + turns[2] + turns[3]
    assert tokens.count(tok.bos_id) == 1 and tok.eos_id not in tokens and tokens[-1] == tok.eot_id
    ignored = lambda ids: [IGNORE_INDEX] * len(ids)  # noqa: E731
    assert labels == [IGNORE_INDEX] + ignored(turns[0]) + turns[1] + ignored(turns[2]) + turns[3]
    assert len(tokens) == len(labels) == proc.prepare(item).num_tokens()
    assert "human" not in tok.decode_text(tokens).lower() and "gpt" not in tok.decode_text(tokens).lower()


def test_user_assistant_role_names_in_any_case_are_accepted(proc):
    a = proc.process_item(_conv("Q?", "A."))
    b = proc.process_item({"conversations": [{"from": "User", "value": "Q?"}, {"from": "ASSISTANT", "value": "A."}]})
    assert a == b


def test_512px_image_gives_a_1060_token_block_in_place(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    proc512 = ItemProcessor(tok, target_size=512)
    _png(tmp_path / "sq.png", size=(600, 600))
    tokens, labels = proc512.process_item(_conv("<|image|>Describe.", "Red.", image="sq.png"), base_dir=tmp_path)
    block = tokens[1:1061]
    assert tokens[0] == tok.bos_id and len(block) == 1060
    assert block[:3] == [tok.boi_id, tok.size_token_id(16), tok.size_token_id(16)] and block[-1] == tok.eoi_id
    rows = np.array(block[3:-1]).reshape(32, 33)
    assert (rows[:, -1] == tok.eol_id).all() and tok.is_image_token(rows[:, :-1]).all()
    assert tokens[1061:] == tok.encode_text("Describe." + EOT) + tok.encode_text("Red." + EOT)
    n_human = 1061 + len(tok.encode_text("Describe." + EOT))
    assert labels[:n_human] == [IGNORE_INDEX] * n_human and labels[n_human:] == tokens[n_human:]
    pixels = preprocess_image(load_image(tmp_path / "sq.png"), 512)
    assert np.array_equal(tok.parse_image_block(block), tok.encode_images(pixels).numpy())


def test_placeholder_is_inserted_before_the_first_turn_when_text_has_none(proc, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    paths = [str(_png(tmp_path / "a.png")), str(_png(tmp_path / "b.png", color=(0, 0, 255)))]
    prepared = proc.prepare(_conv("What are these?", "Two boxes."), base_dir=None)
    assert prepared.images == []
    prepared = proc.prepare(_conv("What are these?", "Two boxes.", image=paths))
    # "<|image|> <|image|> What are these?" -> [BOS] [img] " " [img] " What are these?<eot>" ...
    assert prepared.segments[0] == [tok.bos_id]
    assert prepared.segments[1] == tok.encode_text(" ")
    assert prepared.segments[2] == tok.encode_text(" What are these?" + EOT) + tok.encode_text("Two boxes." + EOT)
    assert prepared.image_labelled == [False, False]
    explicit = proc.process_item(_conv("<|image|> <|image|> What are these?", "Two boxes.", image=paths))
    assert proc.process_item(_conv("What are these?", "Two boxes.", image=paths)) == explicit


def test_text_around_a_marker_keeps_its_spaces(proc, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    prepared = proc.prepare(_conv("a <|image|> b", "ok", image=str(_png(tmp_path / "x.png"))))
    assert prepared.segments[0] == [tok.bos_id] + tok.encode_text("a ")
    assert tok.decode_text(prepared.segments[1][:len(tok.encode_text(" b"))]) == " b"


def test_image_in_assistant_turn_is_labelled_and_in_human_turn_is_not(proc, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    a, b = str(_png(tmp_path / "a.png")), str(_png(tmp_path / "b.png", size=(40, 90)))
    tokens, labels = proc.process_item(_conv("Edit <|image|> please.", "Here: <|image|>", image=[a, b]))
    spans = tok.find_image_blocks(tokens)
    assert len(spans) == 2
    (s0, e0), (s1, e1) = spans
    assert labels[s0:e0] == [IGNORE_INDEX] * (e0 - s0)
    assert labels[s1:e1] == tokens[s1:e1]
    assert labels[e1:] == tokens[e1:] == [tok.eot_id]
    assert tok.parse_image_block(tokens[s1:e1]).shape == (22, 10)  # 40x90 px -> crop 160x352 (WxH)
    # Text-to-image: the assistant turn is only the image; it is labelled, and so is its end of turn.
    tokens, labels = proc.process_item(_conv("Draw a red box.", "<|image|>", image=a))
    (s, e), = tok.find_image_blocks(tokens)
    assert labels[:s] == [IGNORE_INDEX] * s and labels[s:] == tokens[s:] and tokens[e:] == [tok.eot_id]


def test_prepare_needs_no_vqgan_pickles_and_assembles_like_process_item(proc, tiny_tokenizer, tmp_path):
    text_proc = ItemProcessor(tiny_tokenizer.text_only(), target_size=256)
    path = _png(tmp_path / "p.png", size=(70, 50))
    item = _conv("<|image|>What?", "A box.", image=[str(path)])
    prepared = pickle.loads(pickle.dumps(text_proc.prepare(item)))
    assert prepared.images[0].dtype == np.float32 and prepared.images[0].shape == (3, 192, 288)
    codes = tiny_tokenizer.encode_images(np.stack(prepared.images))
    assert proc.assemble(prepared, list(codes)) == proc.process_item(item)
    with pytest.raises(ItemError, match="is 192x288 px, so it needs 12x18 codes"):
        proc.assemble(prepared, [torch.zeros(4, 4, dtype=torch.long)])


def test_image_bytes_work_like_paths(proc, tmp_path):
    path = _png(tmp_path / "p.png")
    by_path = proc.process_item(_conv("Look.", "Red.", image=str(path)))
    assert proc.process_item(_conv("Look.", "Red.", image=[path.read_bytes()])) == by_path
    assert proc.process_item(_conv("Look.", "Red.", image="p.png"), base_dir=tmp_path) == by_path


# ------------------------------------------------------------------------------------------ errors


def test_placeholder_count_mismatch_names_both_counts(proc, tmp_path):
    path = str(_png(tmp_path / "a.png"))
    with pytest.raises(ItemError, match=r"2 <\|image\|> placeholder\(s\) in the conversation but 1 image\(s\)"):
        proc.prepare(_conv("<|image|> and <|image|>", "ok", image=[path]))
    with pytest.raises(ItemError, match=r"1 <\|image\|> placeholder\(s\) in the conversation but 0 image\(s\)"):
        proc.prepare(_conv("<|image|>", "ok"))


def test_roles_not_alternating_name_the_turn_and_role(proc):
    with pytest.raises(ItemError, match=r"conversations\[1\] is 'human' \(a human turn\) where a assistant turn"):
        proc.prepare({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]})
    with pytest.raises(ItemError, match=r"conversations\[0\] is 'gpt'"):
        proc.prepare({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]})


def test_unknown_role_is_named(proc):
    with pytest.raises(ItemError, match=r"conversations\[1\]: unknown role 'system'"):
        proc.prepare({"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}]})


def test_empty_conversation_is_refused(proc):
    with pytest.raises(ItemError, match="empty conversation"):
        proc.prepare({"conversations": []})
    with pytest.raises(ItemError, match="no 'conversations'"):
        proc.prepare({"image": "x.png"})


def test_nothing_labelled_is_refused(proc):
    with pytest.raises(ItemError, match="nothing to train on: the conversation has no assistant"):
        proc.prepare(_conv("Only a question?"))
    with pytest.raises(ItemError, match="nothing to train on: every assistant turn is empty"):
        proc.prepare(_conv("Q?", "  ", "Q2?", ""))


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "corrupt"])
def test_unreadable_image_names_its_path(proc, tmp_path, case):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        buf = io.BytesIO()
        _gradient(200, 200).save(buf, "PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif case == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ItemError, match=f"image 0 cannot be used: {path}: "):
        proc.prepare(_conv("Look.", "Hm.", image=str(path)))


@pytest.mark.parametrize("side", [40, 50])  # 1600 px: PIL warns; 2500 px: PIL raises (limit 2 * 1000)
def test_decompression_bomb_is_refused_naming_the_file(proc, tmp_path, monkeypatch, side):
    path = _png(tmp_path / "bomb.png", size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ItemError, match=f"{path}: refused as a decompression bomb"):
        proc.prepare(_conv("Look.", "Hm.", image=str(path)))


def test_load_image_errors_are_image_load_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match=r"<5 bytes>: not an image"):
        load_image(b"hello")
