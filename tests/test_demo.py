"""exps/demo.sh, the whole pipeline, end to end with fewer images and steps (a short VQGAN fit, still 2
pre-tokenize ranks, 2-process FSDP training with samples, a stop and a resume, the loss check, plot, inspect
and HF export, generation and the scorer with its floors at 0: too short a run to learn the shapes)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_the_loss_falls(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OUT=str(out), N_IMAGES="32", STEPS="24", EPOCHS="4", LOSS_TARGET="8.0",
               FIT_STEPS="8", BATCH="4", N_FRESH="8", HIDDEN="128", LAYERS="2", T2I_RATIO="0.5", SAMPLE_EVERY="12",
               MIN_COLOUR="0", MIN_SHAPE="0", MIN_BACKGROUND="0", MIN_CAPTIONS="0",
               PYTHON=str(Path(os.sys.executable)))
    env["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{env['PATH']}"  # torchrun of this venv
    proc = subprocess.run(["bash", "exps/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "resuming from" in log and "training done: 24 steps" in log  # second leg resumed and finished

    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and max(steps) == 24  # logged every 2 steps, none twice
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {r["type"] for r in rows} == {"caption", "t2i"} and all(f"loss/{r['type']}" in r for r in rows)
    for rank in (0, 1):
        for name in ("caption", "t2i"):
            assert (out / "tokens" / name / f"{rank}-of-2-done.json").exists()
    assert len(json.loads((out / "tokens" / "t2i" / "record.json").read_text())) == 32
    assert "ratio: 0.5" in (out / "data.yaml").read_text()
    assert (out / "loss.png").stat().st_size > 0 and list((out / "inspect").glob("*.png"))
    assert (out / "hf_model" / "config.json").exists()
    from transformers import ChameleonForConditionalGeneration
    ChameleonForConditionalGeneration.from_pretrained(out / "hf_model")
    assert (out / "bundle" / "fit.stamp").read_text().strip() == "images=32 sizes=128x128 steps=8" and "fit VQGAN" in log
    for step in (12, 24):  # training samples, with the prompts under the pictures
        assert (out / "train" / "samples" / f"step{step}" / "contact_sheet.png").is_file()
    gen = out / "generated"  # every colour x shape x background drawn, the 8 fresh pictures captioned
    assert len(list((gen / "images").glob("000*_0.png"))) == 32 and (gen / "images" / "contact_sheet.png").is_file()
    assert len((gen / "caption" / "generations.jsonl").read_text().splitlines()) == 8
    assert re.search(r"text-to-image: colour \d+/32, shape \d+/32, background \d+/32; captions \d+/8 exact", log)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["t2i"]["colour"]["total"] == 32 and scores["captions"]["total"] == 8
