"""``--in_format energon``: a webdataset prepared by Megatron-Energon (``energon prepare``), as LLaVA-JP keeps it.

    src = EnergonSource(Path("/data/energon"), split="train")
    for it in src.iter_items(range(0, len(src))): ...        # InputItem per sample, ids stable

What is read, and with which of energon's own code (the ``energon`` extra, ``pip install -e .[energon]``):

- ``.nv-meta/split.yaml`` (or ``split.json``) and ``.nv-meta/.info.json`` (or the older ``.info.yaml``):
  through energon's ``WebdatasetMeta.from_config``: the shards of the split, their sample counts, and the
  excluded shards and samples (``exclude: [shard.tar, shard.tar/key, ...]``).
- ``.nv-meta/dataset.yaml`` through energon's ``load_yaml`` (data only): the sample type, current
  (``sample_type: {__module__: megatron.energon, __class__: VQASample}``) or older
  (``__class__: VQAWebdataset``), and its ``field_map``, resolved with energon's own field access
  (``jpg``, ``json[question]``, alternatives ``jpg,png``).
- The shards themselves with :mod:`tarfile`, grouped into samples by energon's own member-name rules
  (``split_name_re``; ``__...__`` metadata members skipped), parts decoded as energon's default decoder
  does for text (``txt`` -> str without its final line break, ``json`` -> JSON, ``cls``/``id`` -> int); image parts stay bytes for our
  loader, pickled parts (``pyd``, ``pth``...) are never loaded.

Order, so every sample has a stable id: shards in the order of the split's list in ``split.yaml`` (as
``energon prepare`` writes them, sorted), samples in archive order, excluded samples left out. Sample
types: ``VQASample``/``VQAWebdataset`` -> human turn ``context`` (LLaVA ``<image>`` markers allowed; else
the image goes first), assistant turn ``answers`` (the first answer when a list);
``CaptioningSample``/``CaptioningWebdataset`` -> human turn ``<|image|>`` alone, assistant turn
``caption``; ``VidQASample``/``VidQAWebdataset`` -> like VQA with ``video`` (its part's bytes decoded with
PyAV like a video file; ``<video>`` markers allowed, else the video goes first). A field that names a video
part (``mp4``, ``webm``, ``mkv``, ``mov``, ``avi``, ``m4v``) is a video in any sample type. Anything else (other types, ``sample_loader`` code, crude samples) is refused at open.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from data.inputs.item import NESTED_TOO_DEEPLY, InputFileError, InputItem, llava_to_lumina

ENERGON_META = ".nv-meta"  # what `energon prepare` adds to a directory of webdataset shards

# sample type -> (kind, fields it needs in field_map); the older *Webdataset names are the same types.
SAMPLE_TYPES = {"VQASample": "vqa", "VQAWebdataset": "vqa",
                "CaptioningSample": "captioning", "CaptioningWebdataset": "captioning",
                "VidQASample": "vidqa", "VidQAWebdataset": "vidqa"}
NEEDED_FIELDS = {"vqa": ("image", "context", "answers"), "captioning": ("image", "caption"),
                 "vidqa": ("video", "context", "answers")}
# parts decoded as video (from the member's bytes, with PyAV) whichever field names them
VIDEO_PARTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")
TEXT_PARTS = ("txt", "text", "transcript")
JSON_PARTS = ("json", "jsn")
INT_PARTS = ("cls", "cls2", "index", "inx", "id")
PICKLE_PARTS = ("pyd", "pickle", "pth", "pt", "npy", "npz", "mp")


def _energon():
    try:
        from megatron.energon.epathlib import EPath
        from megatron.energon.eyaml import load_yaml
        from megatron.energon.flavors.webdataset import config, field_access, metadata
    except ImportError as e:
        raise InputFileError("--in_format energon needs megatron-energon, which is not installed: "
                             "pip install -e .[energon] (or pip install megatron-energon)") from e
    return EPath, load_yaml, config, field_access, metadata


def read_dataset_yaml(path: Path, load_yaml) -> tuple[str, str, dict[str, str]]:
    """(sample type name, kind, field map) of ``.nv-meta/dataset.yaml``; refuses what we cannot read."""
    where = f"--in_filename {path.parents[1]}: {ENERGON_META}/{path.name}"
    if not path.is_file():
        raise InputFileError(f"{where} is missing: prepare the dataset with a sample type, e.g. `energon "
                             f"prepare DIR --sample-type VQASample --field-map '{{\"image\": \"jpg\", "
                             f"\"context\": \"json[question]\", \"answers\": \"txt\"}}'`")
    try:
        d = load_yaml(path.read_bytes())
    except Exception as e:  # energon's ryml parser raises its own types
        raise InputFileError(f"{where} is not valid YAML ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise InputFileError(f"{where}: expected a mapping, got {type(d).__name__}")
    st = d.get("sample_type") if isinstance(d.get("sample_type"), dict) else d
    name = st.get("__class__")
    if name not in SAMPLE_TYPES:
        raise InputFileError(f"{where}: sample type {name!r} is not supported; pre-tokenization reads "
                             f"{', '.join(SAMPLE_TYPES)} (tars whose samples are image + json question + "
                             f"txt answer can also be read as plain shards: --in_format wds)")
    if "sample_loader" in d or "field_map" not in d:
        raise InputFileError(f"{where}: the dataset uses a sample_loader (Python code) instead of a "
                             f"field_map; pre-tokenization reads field_map datasets only (re-run `energon "
                             f"prepare` with --field-map)")
    fields = d["field_map"]
    kind = SAMPLE_TYPES[name]
    if not isinstance(fields, dict) or any(not isinstance(v, str) for v in fields.values()):
        raise InputFileError(f"{where}: field_map must map field names to part names, got {fields!r}")
    missing = [f for f in NEEDED_FIELDS[kind] if f not in fields]
    if missing:
        raise InputFileError(f"{where}: the field_map of {name} has no {', '.join(missing)} "
                             f"(has {', '.join(fields)})")
    return name, kind, fields


class EnergonSource:
    """The samples of one split of an energon-prepared dataset, as Lumina items (see the module docstring)."""

    format = "energon"

    def __init__(self, path: Path, split: str = "train"):
        self.path = self.base_dir = path
        if not path.is_dir():
            raise InputFileError(f"--in_filename {path}: directory not found")
        if not (path / ENERGON_META).is_dir():
            raise InputFileError(f"--in_filename {path}: no {ENERGON_META}/ directory: not a dataset prepared "
                                 f"with `energon prepare` (a plain webdataset directory is --in_format wds)")
        EPath, load_yaml, self._config, self._fa, metadata = _energon()
        self.sample_type, self.kind, self.fields = read_dataset_yaml(path / ENERGON_META / "dataset.yaml",
                                                                     load_yaml)
        try:
            meta = metadata.WebdatasetMeta.from_config(EPath(path), split_part=split)
        except AssertionError as e:  # energon asserts that the split exists
            raise InputFileError(f"--energon_split {split!r}: not a split of {path / ENERGON_META}/split.yaml "
                                 f"({e})") from e
        except Exception as e:  # missing/invalid split.yaml or .info.json, empty split: energon's own errors
            raise InputFileError(f"--in_filename {path}: cannot read the energon metadata in {ENERGON_META}/ "
                                 f"({type(e).__name__}: {e})") from e
        self.excludes = set(meta.sample_excludes)
        self.shards: list[tuple[str, Path, int]] = []  # (name, path, samples after excludes)
        for sh in meta.shards:
            excluded = sum(1 for x in self.excludes if x.startswith(sh.name + "/"))
            local = path / sh.name
            if not local.is_file():
                raise InputFileError(f"--in_filename {path}: shard {sh.name} of split {split!r} is missing")
            self.shards.append((sh.name, local, sh.count - excluded))
        self.fields_access = {f: self._fa.split_field_access(spec) for f, spec in self.fields.items()}

    def __len__(self) -> int:
        return sum(n for _, _, n in self.shards)

    def _samples(self, name: str, local: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
        """(key, {part: member}, tar) per sample of a shard, in archive order, excluded ones skipped."""
        try:
            tf = tarfile.open(local, "r:*")
        except (tarfile.TarError, OSError) as e:
            raise InputFileError(f"--in_filename {self.path}: shard {name} is not a readable tar ({e})") from e
        with tf:
            key, parts = None, {}
            try:
                for m in tf:
                    if not m.isfile() or self._config.skip_meta_re.match(m.name):
                        continue
                    match = self._config.split_name_re.match(m.name)
                    if not match:
                        continue
                    k, ext = match.groups()
                    if k != key:
                        if parts and f"{name}/{key}" not in self.excludes:
                            yield key, parts, tf
                        key, parts = k, {}
                    parts.setdefault(ext, m)
            except tarfile.TarError as e:
                raise InputFileError(f"--in_filename {self.path}: shard {name} is damaged ({e})") from e
            if parts and f"{name}/{key}" not in self.excludes:
                yield key, parts, tf

    def iter_items(self, ids: range) -> Iterator[InputItem]:
        first = 0
        for name, local, count in self.shards:
            if first >= ids.stop:
                return
            if first + count > ids.start:
                i = first
                for key, parts, tf in self._samples(name, local):
                    if i >= ids.stop:
                        break
                    if i >= first + count:
                        raise self._count_mismatch(name, count, "more")
                    if i >= ids.start:
                        yield self._item(i, name, key, parts, tf)
                    i += 1
                if i < min(ids.stop, first + count):
                    raise self._count_mismatch(name, count, f"only {i - first}")
            first += count

    def _count_mismatch(self, name: str, count: int, found: str) -> InputFileError:
        return InputFileError(f"--in_filename {self.path}: shard {name} has {found} samples, but "
                              f"{ENERGON_META}/.info.json counts {count} (after excludes): the shard changed "
                              f"after `energon prepare`; prepare the dataset again")

    def _decode(self, ext: str, data: bytes, where: str):
        if ext in TEXT_PARTS:  # a final line break is the file's, not the text's (as --in_format wds)
            return data.decode("utf-8").rstrip("\r\n")
        if ext in JSON_PARTS:
            return json.loads(data)
        if ext in INT_PARTS:
            return int(data)
        if ext in PICKLE_PARTS:
            raise ValueError(f"part {ext!r} would need pickle or torch.load to decode; not loaded")
        return data

    def _field(self, field: str, parts: dict[str, tarfile.TarInfo], tf: tarfile.TarFile, key: str):
        """(value, part) of ``field`` through its field_map entry, with energon's own field access; ``part``
        is the first alternative present (the one energon's access takes)."""
        access = self.fields_access[field]
        decoded = {}
        for option in access:
            ext = option[0]
            if ext in parts and ext not in decoded:
                decoded[ext] = self._decode(ext, tf.extractfile(parts[ext]).read(), key)
        used = next((option[0] for option in access if option[0] in decoded), None)
        return self._fa.field_access(decoded, access), used

    def _item(self, i: int, name: str, key: str, parts: dict, tf: tarfile.TarFile) -> InputItem:
        where = f"{name} sample {key}"
        values, used = {}, {}
        for field in NEEDED_FIELDS[self.kind]:
            spec = self.fields[field]
            try:
                values[field], used[field] = self._field(field, parts, tf, key)
            except self._fa.FieldAccessError as e:  # a missing part or key
                return InputItem(i, where, error=f"{where}: field {field!r} ({spec}) not found in the sample "
                                                 f"(parts: {', '.join(sorted(parts))}): {e}")
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                return InputItem(i, where, error=f"{where}: field {field!r} ({spec}) cannot be decoded ({e})")
            except RecursionError:
                return InputItem(i, where, error=f"{where}: field {field!r} ({spec}): {NESTED_TOO_DEEPLY}")
            except (KeyError, IndexError, TypeError) as e:  # access into a value of another shape
                return InputItem(i, where, error=f"{where}: field {field!r} ({spec}) not found in the sample "
                                                 f"(parts: {', '.join(sorted(parts))}): {type(e).__name__}: {e}")
        media_field = "video" if self.kind == "vidqa" else "image"
        media = values[media_field]
        if not isinstance(media, (bytes, bytearray)):
            return InputItem(i, where, error=f"{where}: field {media_field!r} ({self.fields[media_field]}) is a "
                                             f"{type(media).__name__}, not an encoded {media_field} file")
        # A video part is a video whichever field names it (a VQASample whose "image" is an mp4 clip).
        media_kind = "video" if self.kind == "vidqa" or used[media_field] in VIDEO_PARTS else "image"
        if self.kind in ("vqa", "vidqa"):
            question, answer = values["context"], values["answers"]
            if isinstance(answer, list):
                answer = answer[0] if answer else None
            if not isinstance(question, str) or not isinstance(answer, str):
                return InputItem(i, where, error=f"{where}: context and answers must be text, got "
                                                 f"{type(question).__name__} and {type(answer).__name__}")
            turns = [question, answer]
        else:
            if not isinstance(values["caption"], str):
                return InputItem(i, where, error=f"{where}: caption must be text, got "
                                                 f"{type(values['caption']).__name__}")
            turns = ["<|image|>" if media_kind == "image" else "<|video|>", values["caption"]]
        item = {"conversations": [{"from": "human", "value": turns[0]}, {"from": "gpt", "value": turns[1]}],
                media_kind: [bytes(media)]}
        return InputItem(i, where, llava_to_lumina(item))
