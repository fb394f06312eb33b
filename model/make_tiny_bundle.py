"""Writes a tiny Chameleon tokenizer bundle for tests and the demo (the code is model/tokenizer/tiny_bundle.py).

    python model/make_tiny_bundle.py --out /tmp/tiny_bundle
    python model/make_tiny_bundle.py --out /tmp/tiny_bundle --seed 1 --num_merges 1500

Same arguments => byte-identical files. ``-h`` lists every flag.
"""

from model.tokenizer.tiny_bundle import main

if __name__ == "__main__":
    main()
