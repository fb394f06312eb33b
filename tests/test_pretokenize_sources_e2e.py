"""End to end for the inputs of issue 13: video conversations, an energon-prepared dataset and padded images,
each pre-tokenized as 2 ranks (bad inputs among them), concatenated, and trained on for a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_pretokenize_energon import VQA_MAP, energon_prepare, jpg, llava_jp_shards
from video_helper import make_video

import finetune_solver
from model.make_tiny_model import make_tiny_model
from pre_tokenize.concat_record import main as concat_main
from pre_tokenize.pre_tokenize import PretokArgs, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def two_ranks_and_concat(src: Path, out: Path, bundle: Path, *extra: str) -> tuple[Path, list[dict]]:
    summaries = [run(PretokArgs.parse(["--in_filename", str(src), "--out_dir", str(out), "--tokenizer_dir",
                                       str(bundle), "--target_size", "64", "--video_target_size", "64",
                                       "--video_frames", "3", "--splits", "2", "--rank", str(r), "--no_progress",
                                       "--num_workers", "1", *extra])) for r in range(2)]
    assert concat_main(["--sub_record_dir", str(out), "--save_path", str(out / "record.json")]) == 0
    return out / "record.json", summaries


@pytest.mark.slow
def test_video_energon_and_padded_inputs_pretokenize_on_two_ranks_concat_and_train(tiny_bundle, tmp_path):
    # video conversations (AuroraCap / LLaVA-video style), one bad clip among them
    vd = tmp_path / "videos"
    vd.mkdir()
    make_video(vd / "a.mp4", n=12)
    make_video(vd / "b.mkv", n=9, w=48, h=64, codec="ffv1")
    (vd / "broken.mp4").write_bytes(b"\x00" * 100)
    videos = [{"conversations": conv(f"What happens in <video>? ({i})", f"The colour changes {i}."),
               "video": "a.mp4" if i % 2 else "b.mkv"} for i in range(6)]
    videos.insert(3, {"conversations": conv("<video>", "Nothing."), "video": "broken.mp4"})
    (vd / "videos.jsonl").write_text("".join(json.dumps(v) + "\n" for v in videos))
    # an energon dataset as LLaVA-JP prepares it, one sample without its answer
    ed = llava_jp_shards(tmp_path / "energon", shards=2, per=3)
    from tar_helper import write_tar
    write_tar(ed / "000002.tar", [("000006.jpg", jpg(6)), ("000006.json", b'{"question": "Q?"}')])
    energon_prepare(ed, "--split-ratio", "1,0,0", "--sample-type", "VQASample", "--field-map", VQA_MAP)
    # LLaVA JSON captions, images padded whole; one image missing
    cd = tmp_path / "captions"
    cd.mkdir()
    caps = []
    for i in range(6):
        (cd / f"{i}.jpg").write_bytes(jpg(100 + i, w=96 + 16 * i, h=32))
        caps.append({"id": str(i), "image": f"{i}.jpg", "conversations": conv("<image>\nDescribe.", f"Wide noise {i}.")})
    caps.append({"id": "x", "image": "missing.jpg", "conversations": conv("<image>", "None.")})
    (cd / "llava.json").write_text(json.dumps(caps))

    tok = tmp_path / "tokens"
    rec_v, sv = two_ranks_and_concat(vd / "videos.jsonl", tok / "video", tiny_bundle)
    rec_e, se = two_ranks_and_concat(ed, tok / "energon", tiny_bundle)
    rec_c, sc = two_ranks_and_concat(cd / "llava.json", tok / "captions", tiny_bundle, "--image_fit", "pad")
    assert [s["records"] for s in sv] == [3, 3] and sum(s["errors_by_reason"].get("video", 0) for s in sv) == 1
    assert sum(s["frames"] for s in sv) == 18 and sum(s["videos"] for s in sv) == 6
    assert sum(s["records"] for s in se) == 6 and sum(s["errors"] for s in se) == 1
    assert sum(s["records"] for s in sc) == 6 and sum(s["errors_by_reason"].get("image", 0) for s in sc) == 1
    assert json.loads((tok / "captions" / "0-of-2-done.json").read_text())["image_fit"] == "pad"
    assert len(json.loads(rec_v.read_text())) == 6 and len(json.loads(rec_e.read_text())) == 6

    (tmp_path / "data.yaml").write_text(f"META:\n  - path: {rec_v}\n  - path: {rec_e}\n  - path: {rec_c}\n")
    model = make_tiny_model(tiny_bundle, tmp_path / "model", seed=0)
    out = tmp_path / "train"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = finetune_solver.main(["--init_from", str(model), "--data_config", str(tmp_path / "data.yaml"),
                                     "--output_dir", str(out), "--precision", "fp32", "--num_workers", "0",
                                     "--log_every", "1", "--batch_size", "2", "--accum_iter", "1", "--epochs", "1",
                                     "--max_steps", "4", "--max_seq_len", "512", "--lr", "1e-3"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, (out / "common.log").read_text()[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
