"""The data side: inputs, items as tokens, the on-disk formats, and what the trainer reads.

    inputs/              pre-tokenization's input sources (JSON, JSONL, webdataset, energon, video), one dispatch
    item_processor.py    one conversation -> (tokens, labels), token for token as Lumina-mGPT
    image_preprocess.py  image loading, checks and Lumina's crops
    pretok_workers.py, pretok_writer.py   pre-tokenization's worker processes and exactly-once writer
    pretok_errors.py     what pre-tokenization rejects (bad input) and what stops it (a bug, too many rejections)
    records.py, lumina_pickle.py          token shards, records and their index; Lumina's .pkl items
    files.py             durable writes (directory fsync, atomic replace); imports nothing of the project
    stop_signals.py      stop signals as a request acted on at a safe point (pre-tokenization and the trainer);
                         imports nothing of the project
    data_config.py, dataset.py, sampler.py, collate.py, packing.py, loader.py, eval_data.py
                         the training data path: data configs, datasets, resumable sampling, batches

May import: model/tokenizer/ (the item processor encodes with it). Never the rest of model/.
"""
