"""The on-disk record/shard/index format (data/records.py) and the restricted Lumina pickle reader."""

import json
import os
import pickle

import numpy as np
import pytest

from data.lumina_pickle import UnsafePickleError, load_lumina_item, loads_plain
from data.records import (
    SHARD_HEADER_BYTES,
    Record,
    RecordFormatError,
    ShardReader,
    ShardWriter,
    build_index,
    index_is_current,
    iter_record_file,
    open_index,
    shard_end_bytes,
)


def _write_items(path, lengths):
    records = []
    with ShardWriter(path) as w:
        for i, n in enumerate(lengths):
            tokens = np.arange(n) + 1000 * i
            labels = np.where(np.arange(n) % 2 == 0, -100, tokens)
            records.append(Record(i, path.name, n, w.append(tokens, labels)))
    return records


def test_shard_items_read_back_exactly_through_the_index(tmp_path):
    records = _write_items(tmp_path / "0-of-1-tokens.bin", [3, 1, 5])
    (tmp_path / "record.json").write_text(json.dumps([json.loads(r.to_json()) for r in records]))
    index = open_index(tmp_path / "record.json")
    assert len(index) == 3 and index_is_current(tmp_path / "record.json")
    reader = ShardReader(index.file_path(0))
    rec = index.record(2)
    tokens, labels = reader.read(rec.offset, rec.len)
    assert tokens.tolist() == [2000, 2001, 2002, 2003, 2004]
    assert labels.tolist() == [-100, 2001, -100, 2003, -100]


def test_shard_size_matches_shard_end_bytes_of_last_item(tmp_path):
    path = tmp_path / "s.bin"
    records = _write_items(path, [4, 7])
    assert path.stat().st_size == shard_end_bytes(records[-1].offset, records[-1].len)


def test_writer_truncates_a_torn_tail_on_resume(tmp_path):
    path = tmp_path / "s.bin"
    records = _write_items(path, [4, 7])
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03")  # half-written next item
    end = shard_end_bytes(records[-1].offset, records[-1].len)
    with ShardWriter(path, truncate_to=end) as w:
        assert w.next_offset == records[-1].offset + 2 * records[-1].len
    assert path.stat().st_size == end


def test_reading_past_the_end_of_a_short_shard_names_the_file(tmp_path):
    path = tmp_path / "s.bin"
    _write_items(path, [4])
    with pytest.raises(RecordFormatError, match="s.bin.*shard holds"):
        ShardReader(path).read(0, 10)


def test_a_file_that_is_not_a_shard_is_refused(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"x" * (SHARD_HEADER_BYTES + 8))
    with pytest.raises(RecordFormatError, match="not a token shard"):
        ShardReader(path)


def test_index_is_rebuilt_when_the_record_file_changes(tmp_path):
    records = _write_items(tmp_path / "s.bin", [2, 2])
    rec_path = tmp_path / "r.jsonl"
    rec_path.write_text("\n".join(r.to_json() for r in records[:1]) + "\n")
    assert len(open_index(rec_path)) == 1
    rec_path.write_text("\n".join(r.to_json() for r in records) + "\n")
    os.utime(rec_path, ns=(1, 1))
    assert not index_is_current(rec_path)
    assert len(open_index(rec_path)) == 2


def test_lumina_records_without_offset_keep_none(tmp_path):
    rec_path = tmp_path / "record.json"
    rec_path.write_text(json.dumps([{"file": "/data/0.pkl", "len": 9, "id": 0}]))
    (rec,) = list(iter_record_file(rec_path))
    assert rec.offset is None
    build_index(rec_path)
    assert open_index(rec_path).record(0).offset is None


def test_a_record_without_len_names_the_file_and_position(tmp_path):
    rec_path = tmp_path / "record.json"
    rec_path.write_text(json.dumps([{"file": "a.pkl", "id": 0}]))
    with pytest.raises(RecordFormatError, match=r"record.json\[0\]"):
        list(iter_record_file(rec_path))


def test_lumina_pickle_with_plain_data_loads(tmp_path):
    path = tmp_path / "0.pkl"
    path.write_bytes(pickle.dumps({"token": [0, 5, 6], "label": [-100, 5, 6]}))
    tokens, labels = load_lumina_item(path)
    assert tokens.tolist() == [0, 5, 6] and labels.tolist() == [-100, 5, 6]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"token": _RunsCode(), "label": []}))
    with pytest.raises(UnsafePickleError, match="evil.pkl.*refused to load"):
        load_lumina_item(path)


def test_numpy_arrays_in_a_pickle_are_refused_too():
    with pytest.raises(UnsafePickleError):
        loads_plain(pickle.dumps(np.arange(3)))


def test_many_file_names_live_in_a_memory_mapped_column_not_in_meta(tmp_path):
    from data.records import MAX_NAMES_IN_META, index_dir_for

    n = MAX_NAMES_IN_META + 10
    rec_path = tmp_path / "record.json"
    rec_path.write_text(json.dumps([{"file": f"items/{i}.pkl", "len": 3, "id": i} for i in range(n)]))
    index = open_index(rec_path)
    meta = json.loads((index_dir_for(rec_path) / "meta.json").read_text())
    assert meta["files"] is None and meta["n_files"] == n
    assert len(index.file_names) == n
    assert index.record(n - 1).file == str(tmp_path / "items" / f"{n - 1}.pkl")
    clone = pickle.loads(pickle.dumps(index.file_names))  # as sent to a DataLoader worker
    assert clone[7] == "items/7.pkl"
