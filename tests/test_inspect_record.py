"""pre_tokenize/inspect_record.py: text view, --json, --render, Lumina pickles (a malicious one refused)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.records import ShardReader, iter_record_file
from pre_tokenize.inspect_record import main
from pre_tokenize.pre_tokenize import PretokArgs, run


@pytest.fixture(scope="module")
def pretokenized(tiny_bundle, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inspect")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(d / "wide.png")
    items = [{"conversations": [{"from": "human", "value": "Look: <|image|> what?"},
                                {"from": "gpt", "value": "A wide noise."}], "image": ["wide.png"]},
             {"conversations": [{"from": "human", "value": "Draw it."},
                                {"from": "gpt", "value": "Here <|image|>"}], "image": ["wide.png"]},
             {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    (d / "data.json").write_text(json.dumps(items))
    run(PretokArgs.parse(["--in_filename", str(d / "data.json"), "--out_dir", str(d / "out"), "--tokenizer_dir",
                          str(tiny_bundle), "--target_size", "128", "--num_workers", "0", "--no_progress"]))
    return d / "out" / "0-of-1-record.jsonl"


def test_text_view_shows_text_image_sizes_and_labelled_spans(pretokenized, tiny_bundle, capsys):
    assert main([str(pretokenized), "--tokenizer_dir", str(tiny_bundle), "--ids", "0", "1"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("### ")[1:]
    assert len(blocks) == 2 and blocks[0].startswith("id 0 ·") and blocks[1].startswith("id 1 ·")
    body0 = blocks[0].split("\n", 1)[1]
    # 128 wide x 64 high at target 128 -> crop 160x96 (WxH) -> shown as HxW
    assert body0 == "<s>Look: [image 96x160] what?<reserved08706>⟦A wide noise.<reserved08706>⟧\n"
    body1 = blocks[1].split("\n", 1)[1]
    assert body1 == "<s>Draw it.<reserved08706>⟦Here [image 96x160]<reserved08706>⟧\n"


def test_json_lines_hold_the_exact_tokens_and_labels(pretokenized, capsys):
    assert main([str(pretokenized), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    reader = ShardReader(pretokenized.parent / "0-of-1-tokens.bin")
    recs = list(iter_record_file(pretokenized))
    assert [d["id"] for d in lines] == [r.id for r in recs] == [0, 1, 2]
    for d, r in zip(lines, recs):
        tokens, labels = reader.read(r.offset, r.len)
        assert set(d) == {"id", "len", "token", "label"}
        assert d["token"] == tokens.tolist() and d["label"] == labels.tolist() and d["len"] == r.len
    assert main([str(pretokenized), "--json", "--limit", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_render_writes_the_decoded_images_and_the_bundle_is_found_via_run_json(pretokenized, tmp_path, capsys):
    assert main([str(pretokenized), "--ids", "1", "--render", str(tmp_path / "png")]) == 0
    assert f"-> {tmp_path / 'png' / '1_0.png'}]" in capsys.readouterr().out
    with Image.open(tmp_path / "png" / "1_0.png") as im:
        assert im.size == (160, 96) and im.mode == "RGB"


def test_lumina_pickle_records_are_read(tmp_path, capsys):
    files = tmp_path / "files"
    files.mkdir()
    recs = []
    for i in range(2):
        (files / f"{i}.pkl").write_bytes(pickle.dumps({"token": [0, 7 + i, 8], "label": [-100, 7 + i, 8], "id": i}))
        recs.append({"file": str(files / f"{i}.pkl"), "len": 3, "id": i})
    (tmp_path / "record.json").write_text(json.dumps(recs))
    assert main([str(tmp_path / "record.json"), "--json", "--ids", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": 1, "len": 3, "token": [0, 8, 8], "label": [-100, 8, 8]}
    assert main([str(files / "0.pkl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token"] == [0, 7, 8]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_with_a_clear_error_and_not_run(tmp_path, caplog):
    marker = tmp_path / "pwned"
    evil = tmp_path / "0.pkl"
    evil.write_bytes(pickle.dumps({"token": [1], "label": [1], "x": _Payload(marker)}))
    assert main([str(evil), "--json"]) == 2
    assert "refused" in caplog.text and "system" in caplog.text and str(evil) in caplog.text
    (tmp_path / "record.jsonl").write_text(json.dumps({"id": 0, "file": "0.pkl", "len": 1}) + "\n")
    assert main([str(tmp_path / "record.jsonl"), "--json"]) == 2
    assert not marker.exists()


def test_text_view_without_a_bundle_says_how_to_get_one(tmp_path):
    (tmp_path / "r.jsonl").write_text("")
    with pytest.raises(SystemExit, match="pass --tokenizer_dir"):
        main([str(tmp_path / "r.jsonl")])


def test_inspect_script_runs_from_the_repo_root_and_has_help():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "pre_tokenize/inspect_record.py", "-h"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--ids", "--json", "--render", "--tokenizer_dir", "--limit"):
        assert flag in r.stdout
