"""Webdataset tar shards (``--in_format wds``): a directory of ``*.tar`` shards, read with :mod:`tarfile`.

A sample is the members sharing a key: an image (jpg/jpeg/png/webp) or a video (mp4/webm/mkv/mov/avi/m4v,
decoded from the member's bytes with PyAV like a video file; ``<video>`` marks its place in the question,
else it goes first), a ``json`` with ``question`` and a ``txt`` answer -> one human turn and one assistant
turn. Shards are taken in name order, members in
archive order.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from data.inputs.item import NESTED_TOO_DEEPLY, InputFileError, InputItem

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")

_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key = up to first dot


def _wds_split(name: str) -> tuple[str, str] | None:
    m = _WDS_KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class WdsSource:
    """A directory of webdataset tar shards, read with :mod:`tarfile` (headers only when counting)."""

    format = "wds"

    def __init__(self, path: Path):
        self.path = path
        self.base_dir = path
        if not path.exists():
            raise InputFileError(f"--in_filename {path}: directory not found")
        self.shards = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not self.shards:
            raise InputFileError(f"--in_filename {path}: no webdataset .tar shards in this directory")
        self._counts = [self._count(s) for s in self.shards]

    def _open(self, shard: Path) -> tarfile.TarFile:
        try:
            return tarfile.open(shard, "r:")
        except (tarfile.TarError, OSError) as e:
            raise InputFileError(f"--in_filename {self.path}: shard {shard.name} is not a readable "
                                 f"uncompressed tar ({e})") from e

    def _count(self, shard: Path) -> int:
        with self._open(shard) as tf:
            return sum(1 for _ in self._samples(tf, shard))

    def _samples(self, tf: tarfile.TarFile, shard: Path):
        """Yields (key, [(ext, member)]) for consecutive members sharing a key (webdataset grouping)."""
        key, members = None, []
        try:
            for m in tf:
                if not m.isfile():
                    continue
                split = _wds_split(m.name)
                if split is None:
                    continue
                if split[0] != key:
                    if members:
                        yield key, members
                    key, members = split[0], []
                members.append((split[1], m))
        except tarfile.TarError as e:
            raise InputFileError(f"--in_filename {self.path}: shard {shard.name} is damaged ({e})") from e
        if members:
            yield key, members

    def __len__(self) -> int:
        return sum(self._counts)

    def iter_items(self, ids: range) -> Iterator[InputItem]:
        first = 0
        for shard, count in zip(self.shards, self._counts):
            if first >= ids.stop:
                return
            if first + count > ids.start:
                i = first
                with self._open(shard) as tf:
                    for key, members in self._samples(tf, shard):
                        if i >= ids.stop:
                            break
                        if i >= ids.start:
                            yield self._sample(i, shard, key, tf, members)
                        i += 1
            first += count

    def _sample(self, i: int, shard: Path, key: str, tf: tarfile.TarFile,
                members: list[tuple[str, tarfile.TarInfo]]) -> InputItem:
        where = f"{shard.name} sample {key}"
        by_ext = {}
        for ext, m in members:
            by_ext.setdefault(ext, m)
        image_ext = next((e for e in WDS_IMAGE_EXTS if e in by_ext), None)
        video_ext = next((e for e in WDS_VIDEO_EXTS if e in by_ext), None)
        if image_ext is None and video_ext is None:
            return InputItem(i, where, error=f"{where}: no image member (one of {', '.join(WDS_IMAGE_EXTS)}) "
                                             f"nor video member (one of {', '.join(WDS_VIDEO_EXTS)}); has "
                                             f"{sorted(by_ext)}")
        if "json" not in by_ext:
            return InputItem(i, where, error=f"{where}: no .json member with a \"question\"")
        read = lambda ext: tf.extractfile(by_ext[ext]).read()  # noqa: E731
        try:
            meta = json.loads(read("json"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return InputItem(i, where, error=f"{where}: {key}.json is not JSON ({e})")
        except RecursionError:
            return InputItem(i, where, error=f"{where}: {key}.json is not usable: {NESTED_TOO_DEEPLY}")
        if not isinstance(meta, dict) or not isinstance(meta.get("question"), str):
            return InputItem(i, where, error=f"{where}: {key}.json has no string \"question\"")
        if "txt" in by_ext:
            try:
                answer = read("txt").decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                return InputItem(i, where, error=f"{where}: {key}.txt is not UTF-8 text ({e})")
        elif isinstance(meta.get("answer"), str):
            answer = meta["answer"]
        else:
            return InputItem(i, where, error=f"{where}: no .txt answer (nor an \"answer\" in the json)")
        item = {"conversations": [{"from": "human", "value": meta["question"]},
                                  {"from": "gpt", "value": answer}]}
        if image_ext is not None:
            item["image"] = [read(image_ext)]
        if video_ext is not None:
            item["video"] = [read(video_ext)]
        return InputItem(i, where, item)


