"""RecordDataset: reads shards, JSON arrays, per-rank JSONL and Lumina pickles; validates with clear errors."""

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from data.data_config import DataSource
from data.dataset import RecordDataset
from data.records import Record, RecordFormatError, ShardWriter, record_name, shard_name


def write_shard_records(out_dir: Path, lens, rank=0, splits=1, first_id=0):
    """One pre-tokenization rank's output: a token shard and its record JSONL. Item k has tokens
    1000*id + (0..len-1) and labels -(those) except a -100 first label, so any mix-up shows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = out_dir / record_name(rank, splits)
    items = {}
    with ShardWriter(out_dir / shard_name(rank, splits)) as w, open(rec, "w") as f:
        for k, n in enumerate(lens):
            rid = first_id + k
            tok = 1000 * rid + np.arange(n)
            lab = -tok
            lab[0] = -100
            off = w.append(tok, lab)
            f.write(Record(rid, shard_name(rank, splits), n, off).to_json() + "\n")
            items[rid] = (tok, lab)
    return rec, items


def test_shard_items_round_trip_and_are_truncated_to_max_seq_len(tmp_path):
    rec, items = write_shard_records(tmp_path, [5, 12, 3])
    ds = RecordDataset([DataSource(rec)], max_seq_len=8)
    assert len(ds) == 3 and ds.lengths.tolist() == [5, 12, 3]
    for i, rid in enumerate(items):
        tok, lab = items[rid]
        got = ds[i]
        assert got["input_ids"].dtype == np.int64
        np.testing.assert_array_equal(got["input_ids"], tok[:8])
        np.testing.assert_array_equal(got["labels"], lab[:8])


def test_reads_concatenated_json_array_and_per_rank_jsonl(tmp_path):
    rec0, items0 = write_shard_records(tmp_path / "pretok", [4, 6], rank=0, splits=2)
    rec1, items1 = write_shard_records(tmp_path / "pretok", [7], rank=1, splits=2, first_id=2)
    arr = [json.loads(line) for r in (rec0, rec1) for line in r.read_text().splitlines()]
    (tmp_path / "pretok" / "record.json").write_text(json.dumps(arr))
    ds = RecordDataset([DataSource(tmp_path / "pretok" / "record.json"), DataSource(rec1, type="b")],
                       max_seq_len=100)
    assert ds.lengths.tolist() == [4, 6, 7, 7]
    assert ds.source_ranges == [(0, 3), (3, 4)] and ds.type_names == ["default", "b"]
    assert ds.types.tolist() == [0, 0, 0, 1]
    np.testing.assert_array_equal(ds[2]["input_ids"], items1[2][0])
    np.testing.assert_array_equal(ds[3]["labels"], items1[2][1])
    np.testing.assert_array_equal(ds[1]["input_ids"], items0[1][0])


def _write_lumina(tmp_path: Path, lens, claimed=None):
    """Lumina's layout: one pickle per item, a JSON array record with absolute 'file' and no offset."""
    (tmp_path / "files").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, n in enumerate(lens):
        p = tmp_path / "files" / f"{i}.pkl"
        with open(p, "wb") as f:
            pickle.dump({"token": list(range(10 * i, 10 * i + n)), "label": [-100] + list(range(1, n))}, f)
        recs.append({"file": str(p), "len": n if claimed is None else claimed[i], "id": i})
    rec = tmp_path / "lumina-record.json"
    rec.write_text(json.dumps(recs))
    return rec


def test_reads_lumina_pickle_records(tmp_path):
    ds = RecordDataset([DataSource(_write_lumina(tmp_path, [3, 5]))], max_seq_len=4)
    assert ds[1]["input_ids"].tolist() == [10, 11, 12, 13]
    assert ds[1]["labels"].tolist() == [-100, 1, 2, 3]


def test_missing_shard_is_an_error_at_open_naming_record_and_item(tmp_path):
    rec, _ = write_shard_records(tmp_path, [4, 5])
    (tmp_path / shard_name(0, 1)).unlink()
    with pytest.raises(RecordFormatError, match=r"item id 0 .*does not exist") as e:
        RecordDataset([DataSource(rec)], max_seq_len=8)
    assert str(rec) in str(e.value) and shard_name(0, 1) in str(e.value)


@pytest.mark.parametrize("chunk_rows", [1 << 20, 1])
def test_shard_shorter_than_its_records_is_an_error_at_open(tmp_path, monkeypatch, chunk_rows):
    monkeypatch.setattr("data.dataset._CHUNK_ROWS", chunk_rows)
    rec, _ = write_shard_records(tmp_path, [4, 5, 6])
    shard = tmp_path / shard_name(0, 1)
    with open(shard, "r+b") as f:  # cut into the last item
        f.truncate(shard.stat().st_size - 8)
    with pytest.raises(RecordFormatError, match=r"item id 2 .*shorter than its records claim") as e:
        RecordDataset([DataSource(rec)], max_seq_len=8)
    assert str(rec) in str(e.value)


@pytest.mark.parametrize("chunk_rows", [1 << 20, 2])  # 2: the overlap spans two validation chunks
def test_shard_len_mismatch_is_an_error_at_open(tmp_path, monkeypatch, chunk_rows):
    monkeypatch.setattr("data.dataset._CHUNK_ROWS", chunk_rows)
    rec, _ = write_shard_records(tmp_path, [4, 5, 6])
    lines = rec.read_text().splitlines()
    d = json.loads(lines[1])
    d["len"] = 7  # item 1 really has 5 tokens: 7 would run into item 2
    lines[1] = json.dumps(d)
    rec.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordFormatError, match=r"item id 1 .*past the start of the next record's item .*len does "
                                                r"not match the shard") as e:
        RecordDataset([DataSource(rec)], max_seq_len=8)
    assert str(rec) in str(e.value)


def test_file_that_is_not_a_shard_is_an_error_at_open(tmp_path):
    rec, _ = write_shard_records(tmp_path, [4])
    (tmp_path / shard_name(0, 1)).write_bytes(b"NOTASHARD" * 10)
    with pytest.raises(RecordFormatError, match=r"item id 0 .*not a token shard"):
        RecordDataset([DataSource(rec)], max_seq_len=8)


def test_record_with_len_zero_is_an_error_at_open(tmp_path):
    rec, _ = write_shard_records(tmp_path, [4])
    rec.write_text(rec.read_text() + Record(7, shard_name(0, 1), 0, 8).to_json() + "\n")
    with pytest.raises(RecordFormatError, match=r"item id 7 .*len < 1"):
        RecordDataset([DataSource(rec)], max_seq_len=8)


def test_pickle_len_mismatch_is_an_error_at_read(tmp_path):
    rec = _write_lumina(tmp_path, [3, 5], claimed=[3, 6])
    ds = RecordDataset([DataSource(rec)], max_seq_len=8)
    assert ds[0]["input_ids"].tolist() == [0, 1, 2]
    with pytest.raises(RecordFormatError, match=r"item id 1 .*holds 5 tokens, but the record says len 6") as e:
        ds[1]
    assert str(rec) in str(e.value) and "1.pkl" in str(e.value)


def test_missing_pickle_raises_instead_of_returning_another_item(tmp_path):
    rec = _write_lumina(tmp_path, [3, 5])
    (tmp_path / "files" / "1.pkl").unlink()
    ds = RecordDataset([DataSource(rec)], max_seq_len=8)
    with pytest.raises(RecordFormatError, match=r"item id 1 .*1\.pkl does not exist") as e:
        ds[1]
    assert str(rec) in str(e.value)


def test_unsafe_pickle_is_refused_naming_the_item(tmp_path):
    rec = _write_lumina(tmp_path, [3])
    (tmp_path / "files" / "0.pkl").write_bytes(pickle.dumps(OrderedDict(token=[1, 2, 3], label=[1, 2, 3])))
    ds = RecordDataset([DataSource(rec)], max_seq_len=8)
    with pytest.raises(RecordFormatError, match=r"item id 0 .*refused to load collections.OrderedDict"):
        ds[0]


def test_dataset_pickles_without_copying_mapped_arrays(tmp_path):
    rec, items = write_shard_records(tmp_path, [50] * 200)
    ds = RecordDataset([DataSource(rec)], max_seq_len=64)
    ds[0]  # opens the maps in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # the state is paths and small numbers; maps and lengths reopen lazily
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(copy[199]["input_ids"], items[199][0])
    assert copy.lengths.tolist() == [50] * 200
