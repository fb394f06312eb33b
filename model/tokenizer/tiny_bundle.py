"""Writes a tiny Chameleon tokenizer bundle: same files, format and id layout as Meta's release, tiny sizes.

    python model/make_tiny_bundle.py --out /tmp/tiny_bundle
    python model/make_tiny_bundle.py --out /tmp/tiny_bundle --seed 1 --num_merges 1500
    python model/make_tiny_bundle.py --out /tmp/demo_bundle --fit_images output/demo/data/images --fit_steps 400

The directory gets the three files of ``ckpts/chameleon/tokenizer/``:

- ``text_tokenizer.json``: a byte-level BPE written by the ``tokenizers`` library. Ids as in Chameleon:
  ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the 8192 image codes ``IMGIMG<letters>Z`` at 4..8195,
  ``<eoss>`` 8196, ``<racm3:break>`` 8197, ``<reservedNNNNN>`` at NNNNN+4 (08194..08999), then the text
  BPE (256 byte tokens and ``--num_merges`` merges trained on seeded English-like text).
- ``vqgan.yaml`` / ``vqgan.ckpt``: a taming-transformers VQGAN with 16x downsampling and 8192 codes,
  seeded random weights (it tokenizes, it does not reconstruct), small enough to encode a 256x256 image
  in about 10 ms on one CPU core. With ``--fit_images DIR`` the VQGAN is then fitted to the pictures in DIR
  (model/tokenizer/vqgan_fit.py: VQ-VAE losses, on the CPU, ~200 CPU-s for the demo), so it
  reconstructs pictures like them, roughly (bench/RESULTS.md); the file format and layout stay the same.

The same arguments write byte-identical files (no timestamps; seeded generators only). A fitted VQGAN is
seeded too, but float arithmetic across machines and torch builds may differ in the last bits.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import random
from pathlib import Path

import torch
import yaml
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model.tokenizer.vqgan import VQGAN, VQGANConfig
from model.tokenizer.vqgan_fit import FitConfig, fit_vqgan, load_fit_images

logger = logging.getLogger(__name__)

NUM_IMAGE_CODES = 8192
FIRST_RESERVED, LAST_RESERVED = 8194, 8999  # <reservedNNNNN> sits at id NNNNN + 4, as in Chameleon
DEFAULT_NUM_MERGES = 1500

# Encoder levels hold no residual blocks: on 2 CPU cores a 256x256 image encodes in ~11 ms this way and
# ~75 ms with one block per level (the full-resolution block dominates). The decoder gets
# num_res_blocks + 1 = 1 block per level. Channels are multiples of 32 for taming's GroupNorm(32).
TINY_VQGAN = VQGANConfig(embed_dim=8, n_embed=NUM_IMAGE_CODES, z_channels=16, resolution=256, in_channels=3,
                         out_ch=3, ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=0, attn_resolutions=(),
                         dropout=0.0, double_z=False)
# The encoder's z has a standard deviation of about 0.23 at initialisation; a codebook on the same scale
# makes neighbouring latents pick different codes (with N(0, 1) codes nearly every image maps to a few
# dozen codes), so code round trips in tests are meaningful.
CODEBOOK_STD = 0.25

WORDS = """the of and to a in is it you that he was for on are with as his they be at one have this from
or had by hot word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live where after back little
only round man year came show every good me give our under name very through just form sentence great
think say help low line differ turn cause much mean before move right boy old too same tell does set
three want air well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among image photo describe caption shows detailed scene left right background""".split()
PUNCT = [".", ".", ".", ",", ",", "?", "!", ";", ":"]


def code_name(code: int) -> str:
    """VQ code -> its vocabulary entry: decimal digits 0..9 as letters A..J, ``IMGIMG`` prefix, ``Z`` suffix."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def reserved_name(n: int) -> str:
    return f"<reserved{n:05d}>"


def special_vocab() -> list[str]:
    """The entries at ids 0..9003, in id order."""
    names = ["<s>", "<pad>", "</s>", "<unk>"]
    names += [code_name(c) for c in range(NUM_IMAGE_CODES)]
    names += ["<eoss>", "<racm3:break>"]
    names += [reserved_name(n) for n in range(FIRST_RESERVED, LAST_RESERVED + 1)]
    assert names.index(reserved_name(8706)) == 8706 + 4
    return names


def english_like_text(seed: int, num_sentences: int = 6000) -> list[str]:
    """Seeded sentences from a fixed word list, with capitals, digits, punctuation, quotes and newlines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        n = rng.randint(3, 16)
        words = [rng.choice(WORDS) for _ in range(n)]
        if rng.random() < 0.15:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2024)))
        if rng.random() < 0.05:
            words.insert(rng.randrange(len(words)), f'"{rng.choice(WORDS)}"')
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice(PUNCT)
        lines.append(s + ("\n" if rng.random() < 0.2 else " "))
    return lines


def build_text_tokenizer(seed: int, num_merges: int = DEFAULT_NUM_MERGES) -> Tokenizer:
    """Byte-level BPE with Chameleon's special-token id layout in front of the trained text vocabulary."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, min_frequency=2,
                                  initial_alphabet=alphabet, show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator(english_like_text(seed), trainer=trainer)
    text_vocab = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])
    # The python BPE object does not expose its merges; read them back from the serialized model.
    merges = [tuple(m) for m in json.loads(trainer_tok.to_str())["model"]["merges"]]

    names = special_vocab()
    vocab = {name: i for i, name in enumerate(names)}
    for token, _ in text_vocab:
        if token in vocab:
            raise RuntimeError(f"trained token {token!r} collides with a special entry")
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Control tokens are matched in text as whole strings (Chameleon registers them as special added
    # tokens); image codes are plain vocabulary entries, so text can never spell an image code.
    specials = [n for n in names if not n.startswith("IMGIMG")]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in specials])
    # Like Meta's file, the post-processor prepends <s>; callers encode with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return tok


def build_tiny_vqgan(seed: int) -> VQGAN:
    torch.manual_seed(seed)
    model = VQGAN(TINY_VQGAN)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        model.quantize.embedding.weight.copy_(
            torch.randn(TINY_VQGAN.n_embed, TINY_VQGAN.embed_dim, generator=g) * CODEBOOK_STD)
    return model.eval()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_tiny_bundle(out: str | os.PathLike, seed: int = 0, num_merges: int = DEFAULT_NUM_MERGES,
                     fit_images: str | os.PathLike | None = None, fit: FitConfig | None = None,
                     progress: bool = True) -> Path:
    """Writes text_tokenizer.json, vqgan.yaml, vqgan.ckpt into ``out`` (created); returns the directory.

    With ``fit_images`` (a folder of pictures) the VQGAN is fitted to them (``fit``, seeded by ``seed``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_text_tokenizer(seed, num_merges)
    _write_atomic(out / "text_tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
    _write_atomic(out / "vqgan.yaml",
                  yaml.safe_dump(TINY_VQGAN.to_yaml_dict(), sort_keys=False).encode("utf-8"))
    model = build_tiny_vqgan(seed)
    if fit_images is not None:
        fit = dataclasses.replace(fit or FitConfig(), seed=seed)
        fit_vqgan(model, load_fit_images(fit_images), fit, progress=progress)
    buf = io.BytesIO()  # saving to a buffer keeps the zip's inner folder name independent of the path
    torch.save({"state_dict": {k: v.contiguous() for k, v in model.state_dict().items()}}, buf)
    _write_atomic(out / "vqgan.ckpt", buf.getvalue())
    logger.info("wrote tiny bundle to %s (vocab %d, VQGAN %d codes)", out, tok.get_vocab_size(), NUM_IMAGE_CODES)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write the bundle into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the text corpus, BPE and VQGAN weights")
    parser.add_argument("--num_merges", type=int, default=DEFAULT_NUM_MERGES,
                        help="number of BPE merges learned on top of the 256 byte tokens")
    parser.add_argument("--fit_images", type=Path, default=None,
                        help="fit the VQGAN to the pictures in this folder (png/jpg/webp/bmp, searched recursively) "
                             "so that it reconstructs pictures like them; without it the VQGAN keeps random weights")
    parser.add_argument("--fit_steps", type=int, default=FitConfig.steps,
                        help=f"optimizer steps of the fit (default {FitConfig.steps}); more steps, sharper pictures")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar while fitting")
    args = parser.parse_args(argv)
    if args.fit_steps < 1:
        parser.error(f"--fit_steps must be >= 1 (got {args.fit_steps})")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        make_tiny_bundle(args.out, args.seed, args.num_merges, args.fit_images, FitConfig(steps=args.fit_steps),
                         progress=not args.no_progress)
    except FileNotFoundError as e:
        parser.exit(2, f"make_tiny_bundle: {e}\n")


if __name__ == "__main__":
    main()
