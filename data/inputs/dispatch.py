"""The one dispatch of pre-tokenization's inputs: ``--in_format`` and a path -> a source of items.

Formats (``--in_format``; ``auto`` picks by path):
    json, llava, jsonl  Lumina / LLaVA JSON lists and JSONL files (data/inputs/json_files.py)
    wds      a directory of webdataset ``*.tar`` shards (data/inputs/webdataset.py)
    energon  a dataset prepared by Megatron-Energon's ``energon prepare`` (a directory with ``.nv-meta/``;
             ``auto`` picks it for such a directory): the shards of one split (``--energon_split``) of
             ``.nv-meta/split.yaml``, in its order, samples in archive order, excluded ones left out; the
             sample type and field map of ``.nv-meta/dataset.yaml``: ``VQASample`` (``VQAWebdataset``)
             -> image, ``context`` as the human turn, ``answers`` (the first, if a list) as the assistant
             turn; ``CaptioningSample`` (``CaptioningWebdataset``) -> a human turn that is just the image,
             ``caption`` as the assistant turn; ``VidQASample`` (``VidQAWebdataset``) -> like VQA with a
             video (a part such as ``mp4`` is a video in any sample type). Other sample types, and
             ``sample_loader`` code, are refused (data/inputs/energon.py).
    parquet  one ``.parquet`` file, a glob of them, or a directory of them (the Hub layout
             ``data/train-00000-of-00002.parquet``; ``--hf_split`` picks the split's files; ``auto`` picks it
             for a ``.parquet`` path, a glob, or a directory with parquet files and no ``.tar`` shards)
    hf       a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder (``--hf_split``; ``auto``
             picks it for a directory with ``state.json`` or ``dataset_dict.json``). Both read with pyarrow
             (the ``hf`` extra), columns as data/inputs/arrow_tables.py says, renamed by ``--field_map``.

Every source has ``format``, ``base_dir``, ``len()`` and ``iter_items(ids)`` yielding an
:class:`~data.inputs.item.InputItem` per id of the range, in order (data/inputs/item.py).
"""

from __future__ import annotations

from pathlib import Path

from data.inputs.arrow_tables import HF_DICT, HF_STATE, HfDiskSource, ParquetSource, parse_field_map
from data.inputs.energon import ENERGON_META, EnergonSource
from data.inputs.item import InputFileError
from data.inputs.json_files import JsonListSource, JsonlSource
from data.inputs.webdataset import WdsSource

FORMATS = ("auto", "json", "llava", "jsonl", "wds", "energon", "parquet", "hf")
TABLE_FORMATS = ("parquet", "hf")  # the formats --field_map and --hf_split apply to


def _auto_dir(path: Path) -> str:
    if (path / ENERGON_META).is_dir():
        return "energon"
    if (path / HF_STATE).is_file() or (path / HF_DICT).is_file():
        return "hf"
    if not any(p.suffix == ".tar" for p in path.iterdir()) and next(path.rglob("*.parquet"), None) is not None:
        return "parquet"
    return "wds"


def open_input(path: str | Path, in_format: str = "auto", energon_split: str = "train", hf_split: str = "train",
               field_map: str | None = None):
    """Opens ``path`` as a source of items (see the module docstring); checks the file at once."""
    path = Path(path)
    if in_format not in FORMATS:
        raise InputFileError(f"--in_format {in_format!r}: expected one of {', '.join(FORMATS)}")
    fields = parse_field_map(field_map)
    if in_format == "auto":
        if path.is_dir():
            in_format = _auto_dir(path)
        elif path.suffix.lower() == ".parquet" or (not path.exists() and any(c in str(path) for c in "*?[")):
            in_format = "parquet"
        elif path.suffix.lower() == ".jsonl":
            in_format = "jsonl"
        elif path.suffix.lower() == ".json":
            in_format = "json?"
        elif not path.exists():
            raise InputFileError(f"--in_filename {path}: file not found")
        else:
            raise InputFileError(f"--in_filename {path}: cannot tell the format from the name; pass "
                                 f"--in_format (one of {', '.join(FORMATS[1:])})")
    if fields and in_format not in TABLE_FORMATS:
        raise InputFileError(f"--field_map applies to --in_format {' and '.join(TABLE_FORMATS)}, not {in_format.rstrip('?')}")
    if in_format == "parquet":
        return ParquetSource(path, hf_split, fields)
    if in_format == "hf":
        return HfDiskSource(path, hf_split, fields)
    if in_format == "energon":
        return EnergonSource(path, energon_split)
    if in_format == "wds":
        if path.exists() and not path.is_dir():
            raise InputFileError(f"--in_filename {path}: --in_format wds needs a directory of .tar shards")
        return WdsSource(path)
    if path.is_dir():
        raise InputFileError(f"--in_filename {path}: is a directory; for webdataset shards use "
                             f"--in_format wds (or auto)")
    if in_format == "jsonl":
        return JsonlSource(path)
    return JsonListSource(path, llava={"json?": None, "json": False, "llava": True}[in_format])
