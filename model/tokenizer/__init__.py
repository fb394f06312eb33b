"""The image+text tokenizer of Chameleon: a bundle of a BPE text tokenizer and a VQGAN.

    bundle.py       ChameleonTokenizer: text BPE + image codes, the id layout, special tokens
    vqgan.py        the VQGAN (taming-transformers' modules) loaded safely from vqgan.yaml / vqgan.ckpt
    vqgan_fast.py   the encoder's CPU fast path (packed weights, fused adds, memory reuse)
    vqgan_fit.py    fits a VQGAN to a folder of images (VQ-VAE losses, straight-through, code restarts)
    tiny_bundle.py  a seeded tiny bundle for tests and the demo (model/make_tiny_bundle.py runs it),
                    its VQGAN optionally fitted to pictures (--fit_images)

May import: torch, taming, tokenizers, PIL, numpy, yaml, tqdm. Nothing else of this project.
"""
