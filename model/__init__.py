"""The model side: at this level the network and its weights; the rest in three packages by concern.

    chameleon_lm.py     the Chameleon LM (transformers' model) with the chunked loss; loading HF weights
    qk_norm.py          q/k norm layouts (per head, grouped) and their conversion
    lumina_layout.py    Lumina-mGPT's checkpoint layout (read and write)
    sharded_load.py     safetensors weights loaded by slices on every rank
    export_hf.py        stage script: a training checkpoint -> HF (or Lumina) model dir
    make_tiny_model.py  stage script: a tiny HF Chameleon for tests and the demo
    make_tiny_bundle.py stage script: a tiny tokenizer bundle (code in tokenizer/tiny_bundle.py)

    tokenizer/   the image+text tokenizer: bundle, VQGAN, CPU fast encoder
    training/    what the trainer wires: parallelism, checkpoints, launch, optimizer, metrics, controls
    generation/  decoding, prompts, generation outputs and samples during training

The network modules import only each other and tokenizer/; never data/ (export_hf.py, a stage script, also
uses training/'s checkpoint reader). No module under model/ imports the training data path (data/loader,
dataset, sampler, collate).
"""
