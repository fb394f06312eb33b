"""exps/score_demo.py: the demo's pixel-statistics scorer gets drawn pictures right and damaged ones wrong."""

from __future__ import annotations

import importlib
import itertools
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(request):
    """exps/make_demo_data.py and exps/score_demo.py imported as the scripts see each other (exps/ on the path)."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(REPO / "exps"))
    request.addfinalizer(mp.undo)
    return importlib.import_module("make_demo_data"), importlib.import_module("score_demo")


def test_classify_names_every_drawn_picture_right_at_every_size_scaled_and_blurred(demo):
    data, score = demo
    for colour, shape, bg, size in itertools.product(data.COLOURS, data.SHAPES, data.BACKGROUNDS, data.SIZES):
        img = data.draw(data.ShapeSpec(colour, shape, bg, size))
        for variant in (img, img.resize((size[0] // 2, size[1] // 2)), img.filter(ImageFilter.GaussianBlur(2))):
            seen = score.classify(variant)
            assert (seen.colour, seen.shape, seen.background) == (colour, shape, bg), (size, seen)


def test_classify_sees_damage(demo):
    data, score = demo
    img = data.draw(data.ShapeSpec("red", "circle", "white", (128, 128)))
    a = np.asarray(img).copy()
    a[:, :, :] = a[:, :, [2, 1, 0]]  # red <-> blue channels: a blue circle on white
    assert score.classify(Image.fromarray(a)).colour == "blue"
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert score.classify(Image.fromarray(noise)).shape is None
    blank = Image.new("RGB", (128, 128), data.BACKGROUNDS["black"])
    seen = score.classify(blank)
    assert seen.background == "black" and seen.shape is None and seen.colour is None
    half = np.asarray(data.draw(data.ShapeSpec("green", "square", "black", (128, 128)))).copy()
    half[:, 64:] = data.BACKGROUNDS["black"]  # half a square is a rectangle, not a square
    assert score.classify(Image.fromarray(half)).shape != "square"


def _write_run(folder, rows, images):
    folder.mkdir(parents=True)
    for name, img in images.items():
        img.save(folder / name)
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_scores_and_floors_on_generation_folders(demo, tmp_path, capsys):
    data, score = demo
    specs = [data.ShapeSpec(c, s, b, (128, 128)) for c, s, b in
             itertools.islice(itertools.product(data.COLOURS, data.SHAPES, data.BACKGROUNDS), 8)]
    images, rows = {}, []
    for i, spec in enumerate(specs):
        # the last two pictures do not show what was asked: another colour, then another shape
        shown = spec if i < 6 else data.ShapeSpec(
            "blue" if i == 6 and spec.colour != "blue" else spec.colour,
            "triangle" if i == 7 and spec.shape != "triangle" else spec.shape, spec.background, spec.size)
        images[f"{i:05d}_0.png"] = data.draw(shown)
        rows.append({"prompt_index": i, "prompt": spec.caption, "images": [f"{i:05d}_0.png"], "text": "<|image|>"})
    _write_run(tmp_path / "t2i", rows, images)
    truth = [{"conversations": [{"from": "human", "value": "<|image|>What is in this picture?"},
                                {"from": "gpt", "value": s.caption}], "image": ["x.png"]} for s in specs]
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    answers = [s.caption for s in specs[:7]] + ["A red squamond on a black background."]
    _write_run(tmp_path / "cap", [{"prompt_index": i, "prompt": "", "images": [], "text": t}
                                  for i, t in enumerate(answers)], {})
    args = ["--t2i", str(tmp_path / "t2i"), "--captions", str(tmp_path / "cap"), "--truth", str(tmp_path / "truth.json")]
    assert score.main(args + ["--out", str(tmp_path / "s.json")]) == 1  # default floors: colour 7/8 < 90%
    out = capsys.readouterr().out
    assert "text-to-image: colour 7/8, shape 7/8, background 8/8; captions 7/8 exact" in out
    assert json.loads((tmp_path / "s.json").read_text())["captions"] == {"right": 7, "total": 8}
    assert score.main(args + ["--min_shape", "0.9"]) == 1
    assert score.main(args + ["--min_colour", "0.8", "--min_shape", "0.8", "--min_captions", "0.8"]) == 0
    assert score.main(args + ["--min_colour", "0.8", "--min_shape", "0.8", "--min_captions", "0.9"]) == 1


def test_make_demo_data_draws_only_the_sizes_it_is_given_and_the_same_files_by_default(demo, tmp_path):
    data, _ = demo
    data.make_demo_data(tmp_path / "square", 12, 0, sizes=((128, 128),))
    assert {Image.open(p).size for p in (tmp_path / "square" / "images").iterdir()} == {(128, 128)}
    data.make_demo_data(tmp_path / "a", 12, 0)
    data.make_demo_data(tmp_path / "b", 12, 0, sizes=data.SIZES)
    sizes = {Image.open(p).size for p in (tmp_path / "a" / "images").iterdir()}
    assert len(sizes) > 1 and sizes <= set(data.SIZES)
    for name in ("caption.json", "t2i.json", "images/00005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
