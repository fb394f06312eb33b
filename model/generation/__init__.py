"""Generation: Lumina's decoding rules with batched classifier-free guidance, prompts and outputs.

    generator.py  Generator: loads a model and bundle, decodes images and text (generate.py, the trainer's
                  samples and the benchmarks all use it)
    compiled.py   the compiled decode step over a static KV cache (Generator(compile=True), --compile)
    prompts.py    prompts built by the item processor, token-identical to training sequences; the
                  text-to-image template; GenerationInputError
    samples.py    generation outputs on disk (images, generations.jsonl, contact sheet) and the samples the
                  trainer generates during a run

May import: the network (model/*.py), model/tokenizer/, training/checkpointing.py (to read training
checkpoints and keep the trainer's RNG intact) and, of data/, only the item processor.
"""
