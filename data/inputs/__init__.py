"""The input sources of pre-tokenization, one module per source family, behind one dispatch.

    item.py          what every source yields (InputItem per id, InputFileError for a bad file), rank ranges
    dispatch.py      --in_format and a path -> a source (FORMATS, open_input)
    json_files.py    Lumina JSON, LLaVA JSON, JSONL
    webdataset.py    webdataset tar shards
    energon.py       Megatron-Energon prepared datasets (the ``energon`` extra)
    arrow_tables.py  Hugging Face ``datasets`` data: parquet shards, save_to_disk folders (the ``hf`` extra:
                     pyarrow)
    video.py         video frames for video items, decoded with PyAV (the ``video`` extra)

May import: the standard library, PIL, numpy, the optional packages named above, and data/image_preprocess.py
(the image checks that video frames share). Never model/ or the training data path.
"""
