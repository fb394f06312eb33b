"""Generation (model/generation/generator.py, generate.py, model/generation/samples.py): Lumina-mGPT's decoding rules, batched CFG,
per-sample determinism, bad input, the CLI, and samples during training that leave the losses unchanged."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import generate
from dist_helper import REPO, make_learnable_data, run, torchrun
from model.generation.generator import DecodeSettings, GenerationInputError, Generator, block_len
from model.make_tiny_model import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle, tmp_path_factory):
    return make_tiny_model(tiny_bundle, tmp_path_factory.mktemp("gen_model") / "model", seed=0)


@pytest.fixture(scope="module")
def gen(tiny_model, tiny_bundle):
    return Generator.from_pretrained(tiny_model, tiny_bundle, device="cpu", precision="fp32")


PROMPTS = ["a red square", "two small blue circles on a green field, seen from above"]


def logits_of(gen, seq) -> torch.Tensor:
    """Last-position logits of one unpadded, uncached forward (what Lumina's separate forwards compute)."""
    with torch.no_grad():
        return gen.lm.logits(torch.tensor([seq]))[0, -1].float()


# ----------------------------------------------------------------------------------------------------------
# the image block grammar


def test_image_block_has_forced_size_tokens_and_rows_of_codes_closed_by_row_ends(gen, tiny_tokenizer):
    tok = tiny_tokenizer
    outs = gen.generate_images(PROMPTS[:1], resolution=(96, 64), n=2, seed=3)
    for g in outs:
        t = g.tokens
        assert t[:3] == [tok.boi_id, tok.size_token_id(2), tok.size_token_id(3)]  # height first
        assert len(t) == block_len(2, 3) and t[-1] == tok.eoi_id and g.stop == "image"
        rows = torch.tensor(t[3:-1]).view(4, 7)
        assert (rows[:, -1] == tok.eol_id).all()
        assert tok.is_image_token(rows[:, :-1]).all()
        assert g.image_codes[0].shape == (4, 6) and g.text == "<|image|>"
    assert outs[0].tokens != outs[1].tokens  # two samples, two streams


def test_without_resolution_the_model_picks_size_tokens_and_the_grid_follows_them(gen, tiny_tokenizer):
    tok = tiny_tokenizer
    g = gen.generate_images(["Generate an image of 64x64 according to the following prompt:\nred"], n=1,
                            max_new_tokens=60, seed=1)[0]
    sizes = {tok.size_token_id(n): n for n in range(1, 200)}
    h, w = sizes[g.tokens[1]], sizes[g.tokens[2]]
    assert block_len(h, w) <= 60 and len(g.tokens) == block_len(h, w)
    assert g.image_codes[0].shape == (2 * h, 2 * w)


# ----------------------------------------------------------------------------------------------------------
# CFG, padding, processors


def test_left_padded_rows_give_the_logits_of_unpadded_forwards(gen):
    seen = {}
    reqs = gen.image_requests(PROMPTS, (64, 64))
    assert len(reqs[0].tokens) != len(reqs[1].tokens)

    def observer(t, logits, scores, cfg_rows):
        if t in (0, 5):
            seen[t] = logits[:2].clone()

    outs = gen.run(reqs, DecodeSettings(cfg=1.0, seed=0), observer=observer)
    for b, r in enumerate(reqs):
        assert torch.allclose(seen[0][b], logits_of(gen, r.tokens), atol=1e-5)
        assert torch.allclose(seen[5][b], logits_of(gen, r.tokens + outs[b].tokens[:5]), atol=1e-5)


def test_cfg_equals_uncond_plus_cfg_times_cond_minus_uncond_from_two_separate_forwards(gen, tiny_tokenizer):
    cfg = 3.0
    reqs = gen.image_requests(PROMPTS, (64, 64))
    seen = {}

    def observer(t, logits, scores, cfg_rows):
        seen[t] = (scores[:2].clone(), list(cfg_rows))

    outs = gen.run(reqs, DecodeSettings(cfg=cfg, seed=5), observer=observer)
    assert seen[0][1] == seen[1][1] == seen[2][1] == []  # <racm3:break> and the size tokens: no guidance
    checked = 0
    for t in (3, 4, 9, 20):  # codes, a forced row end (t=7 would be one too), later rows
        scores, rows = seen[t]
        assert rows == [0, 1]
        for b, r in enumerate(reqs):
            gen_so_far = outs[b].tokens[:t]
            cond = logits_of(gen, r.tokens + gen_so_far)
            uncond = logits_of(gen, gen_so_far)  # from <racm3:break> on, positions from 0, no prompt
            assert torch.allclose(scores[b], uncond + cfg * (cond - uncond), atol=1e-4), (t, b)
            checked += 1
    assert checked == 8


def lumina_greedy(gen, prompt, n_new, *, cfg, image_top_k, text_top_k, forced=()):
    """Lumina-mGPT's three processors as its inference_solver.py writes them, on one unbatched sequence with
    separate uncached forwards (no KV cache, no padding), then argmax. ``forced``: the first tokens."""
    sp = gen.specials
    seq, out = list(prompt), []
    V = gen.config.vocab_size
    for step in range(n_new):
        if step < len(forced):
            tok = forced[step]
        else:
            ids = torch.tensor(seq)
            scores = logits_of(gen, seq)[None]
            n_start, n_end = int((ids == sp.boi).sum()), int((ids == sp.eoi).sum())
            in_block = n_start == n_end + 1
            if in_block:  # LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor
                start = int(torch.where(ids == sp.boi)[0][-1])
                new_token_num = len(seq[start + 1:])
                if new_token_num >= 2:
                    if cfg != 1.0:
                        unc = logits_of(gen, seq[start:])[None]
                        scores = cfg * (scores - unc) + unc
                    # MultiModalLogitsProcessor (the grid from id - 8804, as Lumina reads it)
                    h_lat, w_lat = (seq[start + 1] - 8804) * 2, (seq[start + 2] - 8804) * 2
                    tokens = seq[start + 3:]
                    if (len(tokens) + 1) % (w_lat + 1) == 0:
                        scores = torch.full_like(scores, -math.inf)
                        scores[:, sp.eol] = 0
                    elif len(tokens) + 1 == (w_lat + 1) * h_lat + 1:
                        scores = torch.full_like(scores, -math.inf)
                        scores[:, sp.eoi] = 0
                    else:
                        suppress = torch.ones(V, dtype=torch.bool)
                        suppress[4:8196] = False
                        scores = torch.where(suppress, -float("inf"), scores)
            k = min(image_top_k if in_block else text_top_k, V)  # InterleavedTopKLogitsWarper
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
            tok = int(scores.argmax(-1))
        seq.append(tok)
        out.append(tok)
        if tok == sp.eot or (forced and tok == sp.eoi):
            break
    return out


def test_greedy_image_tokens_equal_lumina_processors_applied_in_order(gen, tiny_tokenizer):
    tok = tiny_tokenizer
    reqs = gen.image_requests(PROMPTS, (96, 64))
    outs = gen.run(reqs, DecodeSettings(cfg=3.0, image_top_k=50, greedy=True))
    for r, g in zip(reqs, outs):
        ref = lumina_greedy(gen, r.tokens, len(g.tokens), cfg=3.0, image_top_k=50, text_top_k=10,
                            forced=(tok.boi_id, tok.size_token_id(2), tok.size_token_id(3)))
        assert g.tokens == ref


def test_greedy_answer_tokens_equal_lumina_processors_and_stop_at_end_of_turn(gen, tiny_tokenizer):
    items = [{"conversations": [{"from": "human", "value": "What colour is the square?"},
                                {"from": "gpt", "value": None}]},
             {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                {"from": "human", "value": "and then?"}]}]
    reqs = gen.answer_requests(items)
    outs = gen.run(reqs, DecodeSettings(cfg=1.0, greedy=True, max_new_tokens=12))
    for r, g in zip(reqs, outs):
        ref = lumina_greedy(gen, r.tokens, 12, cfg=1.0, image_top_k=2000, text_top_k=10)
        assert g.tokens == ref
        assert g.stop == ("eot" if ref[-1] == tiny_tokenizer.eot_id else "max_new_tokens")


def test_prompt_is_the_item_processor_sequence_up_to_the_open_assistant_turn(gen, tiny_tokenizer):
    from data.item_processor import ItemProcessor
    tok = tiny_tokenizer
    text = "Generate an image of 64x32 according to the following prompt:\nred"
    full, _ = ItemProcessor(tok).process_item({"conversations": [{"from": "human", "value": text},
                                                                   {"from": "gpt", "value": "ok"}]})
    prompt = gen.image_requests(["red"], (64, 32))[0].tokens
    assert prompt == full[:len(prompt)] and prompt[-1] == tok.eot_id and prompt[0] == tok.bos_id
    assert full[len(prompt):] == tok.encode_text("ok<reserved08706>")


# ----------------------------------------------------------------------------------------------------------
# determinism


def test_sample_k_gets_the_same_tokens_alone_and_in_a_batch(gen):
    kw = dict(resolution=(64, 64), n=2, seed=7, cfg=4.0)
    batch = gen.generate_images(PROMPTS, **kw)
    alone = gen.generate_images(PROMPTS[1:], start_index=1, **kw)
    one_by_one = gen.generate_images(PROMPTS, batch_size=1, **kw)
    assert [g.tokens for g in batch[2:]] == [g.tokens for g in alone]
    assert [g.tokens for g in batch] == [g.tokens for g in one_by_one]
    assert len({tuple(g.tokens) for g in batch}) == 4
    again = gen.generate_images(PROMPTS, **kw)
    assert [g.tokens for g in again] == [g.tokens for g in batch]
    assert [g.tokens for g in gen.generate_images(PROMPTS, **{**kw, "seed": 8})] != [g.tokens for g in batch]


def test_greedy_decoding_is_batch_invariant(gen):
    prompts = PROMPTS + ["a cat"]
    together = gen.generate_images(prompts, resolution=(64, 32), greedy=True)
    for i, p in enumerate(prompts):
        assert gen.generate_images([p], resolution=(64, 32), greedy=True)[0].tokens == together[i].tokens


def test_generation_leaves_the_global_rng_and_the_train_mode_alone(gen):
    gen.lm.train()
    state = torch.get_rng_state()
    gen.generate_images(PROMPTS[:1], resolution=(32, 32), seed=0)
    assert torch.equal(state, torch.get_rng_state()) and gen.lm.training
    gen.lm.eval()


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_bad_resolution_long_prompt_and_finished_conversation_are_refused_naming_them(gen):
    with pytest.raises(GenerationInputError, match="100x64.*multiples of 32"):
        gen.generate_images(["x"], resolution=(100, 64))
    with pytest.raises(GenerationInputError, match="4096x4096.*max_position_embeddings"):
        gen.generate_images(["x"], resolution=(4096, 4096))
    with pytest.raises(GenerationInputError, match="prompt 0.*max_position_embeddings"):
        gen.generate_images(["word " * 4200], resolution=(32, 32))
    with pytest.raises(GenerationInputError, match="conversation 1.*already ends with an answer"):
        gen.answer([{"conversations": [{"from": "human", "value": "a"}]},
                    {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}])


def _cli(argv, monkeypatch, caplog) -> tuple[int, str]:
    """generate.main in this process; loading the weights is an error here (bad input must stop before)."""
    def no_compute(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(generate, "load_lm", no_compute)
    caplog.clear()
    code = generate.main(argv)
    return code, caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "x", "--resolution", "100x64"], "--resolution 100x64"),
    (["--prompt", "x", "--resolution", "4096x4096"], "max_position_embeddings 4096"),
    (["--prompt", "word " * 4200], "prompt 0"),
])
def test_cli_refuses_bad_input_before_any_compute_with_exit_2(tiny_model, tiny_bundle, tmp_path, monkeypatch, caplog,
                                                              extra, message):
    code, log = _cli(["--model", str(tiny_model), "--tokenizer_dir", str(tiny_bundle), "--out", str(tmp_path / "o"),
                      *extra], monkeypatch, caplog)
    assert code == 2 and message in log


def test_cli_refuses_a_bundle_without_vqgan_and_a_finished_conversation(tiny_model, tiny_bundle, tmp_path,
                                                                        monkeypatch, caplog):
    no_vq = tmp_path / "bundle"
    no_vq.mkdir()
    shutil.copy(Path(tiny_bundle) / "text_tokenizer.json", no_vq)
    shutil.copy(Path(tiny_bundle) / "vqgan.yaml", no_vq)
    code, log = _cli(["--model", str(tiny_model), "--tokenizer_dir", str(no_vq), "--prompt", "x", "--out",
                      str(tmp_path / "o")], monkeypatch, caplog)
    assert code == 2 and "vqgan.ckpt is missing" in log
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]))
    code, log = _cli(["--model", str(tiny_model), "--tokenizer_dir", str(tiny_bundle), "--conversations", str(items),
                      "--out", str(tmp_path / "o")], monkeypatch, caplog)
    assert code == 2 and "conversation 0" in log and "already ends with an answer" in log
    with pytest.raises(SystemExit) as e:  # flag errors: argparse's exit 2, naming the flag
        generate.main(["--model", str(tiny_model), "--tokenizer_dir", str(tiny_bundle), "--out", "o", "--prompt", "x",
                       "--resolution", "512"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------------------
# compiled decoding (static KV cache, torch.compile'd step): one compile for the whole test module


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens_greedy_and_sampled_and_repeats_with_the_seed(gen, caplog):
    compiled = Generator(gen.lm, gen.tokenizer, device="cpu", compile=True)
    kw = dict(resolution=(64, 32), cfg=4.0)
    with caplog.at_level("INFO", logger="model.generation.compiled"):
        greedy_c = compiled.generate_images(PROMPTS, greedy=True, **kw)
    assert compiled.compiled.failed is None and compiled.compiled.compile_seconds > 0
    assert "compiled the decode step for 4 rows" in caplog.text  # 2 samples + their unconditional rows
    assert [g.tokens for g in greedy_c] == [g.tokens for g in gen.generate_images(PROMPTS, greedy=True, **kw)]
    sampled_c = compiled.generate_images(PROMPTS, seed=11, **kw)
    assert [g.tokens for g in compiled.generate_images(PROMPTS, seed=11, **kw)] == [g.tokens for g in sampled_c]
    assert [g.tokens for g in sampled_c] == [g.tokens for g in gen.generate_images(PROMPTS, seed=11, **kw)]
    assert [g.tokens for g in sampled_c] != [g.tokens for g in greedy_c]
    # a short last batch is padded to the batch's shape: 3 samples in batches of 2 compile nothing new
    before = compiled.compiled.compile_seconds
    three = compiled.generate_images(PROMPTS + ["a cat"], seed=11, batch_size=2, **kw)
    assert compiled.compiled.compile_seconds == before and len(three) == 3
    assert [g.tokens for g in three[:2]] == [g.tokens for g in sampled_c]


def test_compile_that_cannot_work_falls_back_to_eager_with_one_warning(gen, monkeypatch, caplog):
    import model.generation.compiled as compiled_mod

    def broken(fn, **kw):  # what a machine without a C++ compiler gets from Inductor, at the first call
        def call(*a, **k):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nmore lines")
        return call
    monkeypatch.setattr(compiled_mod.torch, "compile", broken)
    g = Generator(gen.lm, gen.tokenizer, device="cpu", compile=True)
    with caplog.at_level("WARNING"):
        out = g.generate_images(PROMPTS, resolution=(32, 32), greedy=True)
        again = g.generate_images(PROMPTS, resolution=(32, 32), greedy=True)
    warnings_ = [r for r in caplog.records if "--compile" in r.getMessage()]
    assert len(warnings_) == 1 and "decoding eagerly" in warnings_[0].getMessage()
    assert "\n" not in warnings_[0].getMessage()
    eager = gen.generate_images(PROMPTS, resolution=(32, 32), greedy=True)
    assert [x.tokens for x in out] == [x.tokens for x in again] == [x.tokens for x in eager]


def test_compile_of_a_sharded_model_is_refused_with_a_warning(gen, caplog):
    class Sharded(torch.nn.Module):  # stands in for an FSDP2 module: what the Generator checks is unshard()
        def __init__(self, lm):
            super().__init__()
            self.config, self.model, self.lm_head = lm.config, lm.model, lm.lm_head

        def unshard(self):
            pass

        def reshard(self):
            pass
    with caplog.at_level("WARNING"):
        g = Generator(Sharded(gen.lm), gen.tokenizer, device="cpu", compile=True)
    assert g.compiled is None and "sharded model" in caplog.text


# ----------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_writes_pngs_generations_jsonl_and_a_contact_sheet(tiny_model, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    assert generate.main(["--model", str(tiny_model), "--tokenizer_dir", str(tiny_bundle), "--prompt", "a red square",
                          "--prompt", "a blue dot", "--resolution", "64x32", "--n", "2", "--batch_size", "3",
                          "--precision", "fp32", "--device", "cpu", "--seed", "4", "--out", str(out)]) == 0
    rows = [json.loads(ln) for ln in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert r["images"] == [f"{r['prompt_index']:05d}_{r['sample_index']}.png"] and r["text"] == "<|image|>"
        assert Image.open(out / r["images"][0]).size == (64, 32)
        assert r["settings"]["cfg"] == 4.0 and r["settings"]["resolution"] == "64x32" and r["tokens"][0] == 8197
        assert r["prompt"] in ("a red square", "a blue dot") and r["prompt_tokens"][0] == 0
    assert Image.open(out / "contact_sheet.png").size[0] > 64


def test_cli_shows_a_progress_bar_and_no_progress_turns_it_off(tiny_model, tiny_bundle, tmp_path, capsys):
    base = ["--model", str(tiny_model), "--tokenizer_dir", str(tiny_bundle), "--prompt", "a red square", "--n", "3",
            "--batch_size", "2", "--resolution", "32x32", "--device", "cpu", "--precision", "fp32"]
    assert generate.main(base + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "generate: 100%" in err and "3/3" in err and "sample" in err
    assert generate.main(base + ["--out", str(tmp_path / "b"), "--no_progress"]) == 0
    assert "generate:" not in capsys.readouterr().err


def test_cli_answers_lumina_items_with_images_in(tiny_model, tiny_bundle, tmp_path):
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    items = [{"conversations": [{"from": "human", "value": "<|image|> What is this?"}, {"from": "gpt", "value": None}],
              "image": ["red.png"]},
             {"conversations": [{"from": "human", "value": "Say hi."}]}]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    out = tmp_path / "answers"
    assert generate.main(["--model", str(tiny_model), "--tokenizer_dir", str(tiny_bundle), "--conversations",
                          str(tmp_path / "items.jsonl"), "--max_new_tokens", "8", "--cfg", "1.0", "--target_size", "64",
                          "--device", "cpu", "--out", str(out)]) == 0
    rows = [json.loads(ln) for ln in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["tokens"]) <= 8 for r in rows)
    assert 8197 in rows[0]["prompt_tokens"] and 8197 not in rows[1]["prompt_tokens"]  # the image block is in


def test_cli_help_explains_every_flag():
    text = generate.build_parser().format_help()
    for flag in ("--model", "--tokenizer_dir", "--prompt", "--prompts_file", "--conversations", "--resolution", "--cfg",
                 "--image_top_k", "--text_top_k", "--temperature", "--top_p", "--seed", "--max_new_tokens", "--greedy",
                 "--no_greedy", "--n", "--batch_size", "--precision", "--device", "--template", "--out", "--compile",
                 "--no_compile", "--progress", "--no_progress"):
        assert flag in text
    for action in generate.build_parser()._actions:
        assert action.help, action.dest


def test_model_code_does_not_import_the_training_data_path():
    import ast

    def local_imports(mod: str) -> set[str]:
        tree = ast.parse((REPO / (mod.replace(".", "/") + ".py")).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return {m for m in names if (REPO / (m.replace(".", "/") + ".py")).is_file()}

    seen, todo = set(), ["model.generation.generator", "model.generation.samples", "model.generation.prompts"]
    while todo:  # every repository module they reach, lazily imported ones included
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += local_imports(m)
    assert not seen & {"data.loader", "data.dataset", "data.sampler"}, seen


# ----------------------------------------------------------------------------------------------------------
# samples during training


@pytest.fixture(scope="module")
def train_assets(tiny_bundle, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_assets")
    (root / "prompts.txt").write_text("a red square\n# a comment\na blue dot\n")
    return {"model": tiny_model, "data": make_learnable_data(root / "data", n_items=16),
            "prompts": root / "prompts.txt", "bundle": tiny_bundle}


def train_flags(assets, out, *extra, steps: int = 6) -> list[str]:
    return ["--init_from", str(assets["model"]), "--data_config", str(assets["data"]), "--output_dir", str(out),
            "--precision", "fp32", "--num_workers", "0", "--log_every", "1", "--lr", "1e-2", "--batch_size", "2",
            "--accum_iter", "1", "--epochs", "1", "--dropout", "0.1", "--save_iteration_interval", "3",
            "--no_export_hf", "--max_steps", str(steps), *extra]


SAMPLE_FLAGS = ("--sample_every", "2", "--sample_resolution", "64x32", "--sample_cfg", "3.0")


def solve(flags) -> None:
    import finetune_solver
    assert finetune_solver.main(flags) == 0


def losses(out) -> dict:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def test_training_with_samples_has_the_same_losses_and_resumes_bitwise(train_assets, tmp_path):
    a = train_assets
    sampling = (*SAMPLE_FLAGS, "--sample_prompts", str(a["prompts"]), "--sample_tokenizer_dir", str(a["bundle"]))
    solve(train_flags(a, tmp_path / "plain"))
    solve(train_flags(a, tmp_path / "sampled", *sampling, "--tensorboard"))  # samples go there as images too
    plain, sampled = losses(tmp_path / "plain"), losses(tmp_path / "sampled")
    assert sorted(plain) == list(range(1, 7)) and plain == sampled  # bitwise, dropout on
    for step in (2, 4, 6):
        d = tmp_path / "sampled" / "samples" / f"step{step}"
        rows = [json.loads(ln) for ln in (d / "generations.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["a red square", "a blue dot"]
        assert Image.open(d / "00001_0.png").size == (64, 32) and (d / "contact_sheet.png").is_file()
    assert "samples in" in (tmp_path / "sampled" / "common.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(tmp_path / "sampled" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    tb.Reload()
    assert {"samples/0", "samples/1"} <= set(tb.Tags()["images"])
    assert [e.step for e in tb.Images("samples/1")] == [2, 4, 6] and tb.Images("samples/1")[0].width == 64
    prompt = tb.Tensors("samples/1/prompt/text_summary")[0]
    assert prompt.tensor_proto.string_val[0] == b"a blue dot"
    # stop at step 3 (a checkpoint), resume with sampling on: the same losses again
    solve(train_flags(a, tmp_path / "resumed", *sampling, steps=3))
    solve(train_flags(a, tmp_path / "resumed", *sampling))
    assert losses(tmp_path / "resumed") == plain
    # and generate.py reads the training checkpoint through the safe loader
    ckpt = tmp_path / "resumed" / "epoch0-iter6"
    assert generate.main(["--model", str(ckpt), "--tokenizer_dir", str(a["bundle"]), "--prompt", "red",
                          "--resolution", "32x32", "--out", str(tmp_path / "from_ckpt"), "--device", "cpu"]) == 0
    assert (tmp_path / "from_ckpt" / "00000_0.png").is_file()


@pytest.mark.slow
def test_two_rank_training_samples_in_lock_step(train_assets, tmp_path):
    a = train_assets
    flags = train_flags(a, tmp_path, *SAMPLE_FLAGS, "--sample_prompts", str(a["prompts"]), "--sample_tokenizer_dir",
                        str(a["bundle"]))
    flags[flags.index("--batch_size") + 1] = "1"
    run(torchrun(2, ["finetune_solver.py", *flags]), timeout=600)
    for step in (2, 4, 6):  # both ranks ran every forward together (else the run would hang or fail)
        rows = (tmp_path / "samples" / f"step{step}" / "generations.jsonl").read_text().splitlines()
        assert len(rows) == 2 and (tmp_path / "samples" / f"step{step}" / "00000_0.png").is_file()
    assert sorted(losses(tmp_path)) == list(range(1, 7))


def test_bench_generate_runs_the_three_methods_to_complete_image_blocks(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "bench" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:  # each method asserts that it generated exactly the block, ending with <eoss>
        bench.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--resolution", "32x32", "--reps", "1",
                    "--batch_sizes", "1,2"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "(a) transformers generate" in out and "(b) Lumina-style loop" in out and "| 2 |" in out
