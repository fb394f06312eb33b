"""The data config YAML: META entries, defaults, relative paths, and clear errors."""

from pathlib import Path

import pytest

from data.data_config import DataConfigError, DataSource, load_data_config


def _write(tmp_path: Path, text: str, name: str = "data.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def records(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a-record.jsonl", "sub/b.json"):
        (tmp_path / name).write_text("")
    return tmp_path


def test_entries_resolve_relative_to_yaml_dir_not_cwd(records, tmp_path, monkeypatch):
    cfg = _write(records, "META:\n  - path: a-record.jsonl\n    type: t2i\n    ratio: 0.4\n"
                          "  - path: sub/b.json\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    srcs = load_data_config(Path("..") / cfg.name)
    assert [s.path.resolve() for s in srcs] == [(records / "a-record.jsonl").resolve(),
                                                (records / "sub/b.json").resolve()]
    assert srcs[0] == DataSource(path=srcs[0].path, type="t2i", ratio=0.4)
    assert (srcs[1].type, srcs[1].ratio) == ("default", 1.0)


def test_absolute_path_is_kept(records, tmp_path):
    cfg = _write(tmp_path / "sub", f"META:\n  - path: {records / 'a-record.jsonl'}\n", "abs.yaml")
    assert load_data_config(cfg)[0].path == records / "a-record.jsonl"


def test_python_object_tag_is_refused(records):
    cfg = _write(records, "META:\n  - path: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(DataConfigError, match="refused a YAML tag") as e:
        load_data_config(cfg)
    assert str(cfg) in str(e.value)


@pytest.mark.parametrize("entry, match", [
    ("  - path: a-record.jsonl\n    weight: 2\n", r"META\[1\]: unknown key\(s\) \['weight'\]"),
    ("  - path: a-record.jsonl\n    ratio: -0.5\n", r"META\[1\]: 'ratio' must be a finite number >= 0"),
    ("  - path: a-record.jsonl\n    ratio: lots\n", r"META\[1\]: 'ratio'"),
    ("  - path: a-record.jsonl\n    ratio: yes\n", r"META\[1\]: 'ratio'"),
    ("  - path: a-record.jsonl\n    ratio: .nan\n", r"META\[1\]: 'ratio'"),
    ("  - path: a-record.jsonl\n    type: 3\n", r"META\[1\]: 'type' must be a non-empty string"),
    ("  - type: t2i\n", r"META\[1\]: 'path' must be a non-empty string"),
    ("  - missing-record.jsonl\n", r"META\[1\]: must be a mapping"),
    ("  - path: missing-record.jsonl\n", r"META\[1\]: record file .*missing-record.jsonl does not exist"),
])
def test_bad_entry_names_yaml_file_and_entry(records, entry, match):
    cfg = _write(records, "META:\n  - path: a-record.jsonl\n" + entry)
    with pytest.raises(DataConfigError, match=match) as e:
        load_data_config(cfg)
    assert f"data config {cfg}, META[1]" in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("- path: a-record.jsonl\n", "expected a mapping with a 'META' list"),
    ("META: []\n", "non-empty list"),
    ("META:\n  - path: a-record.jsonl\nextra: 1\n", r"unknown top-level key\(s\) \['extra'\]"),
    ("META: [\n", "not valid YAML"),
])
def test_bad_document_is_an_error_naming_the_file(records, text, match):
    cfg = _write(records, text)
    with pytest.raises(DataConfigError, match=match) as e:
        load_data_config(cfg)
    assert str(cfg) in str(e.value)


def test_ratio_zero_is_allowed_to_switch_an_entry_off(records):
    cfg = _write(records, "META:\n  - path: a-record.jsonl\n    ratio: 0\n")
    assert load_data_config(cfg)[0].ratio == 0.0
