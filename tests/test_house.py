"""The layout of the house (issue 20): packages by concern, who may import whom, no import cycles.

These read the source with ``ast`` (every import counts, lazy ones inside functions too), so a new import that
breaks a seam fails here before it spreads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data", "pre_tokenize")
TRAINING_DATA_PATH = {"data.loader", "data.dataset", "data.sampler", "data.collate", "data.packing",
                      "data.data_config", "data.eval_data"}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in PACKAGES:
        for p in (REPO / top).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Project modules that ``name`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    path = MODULES[name]
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {m: _imports(m) for m in MODULES}


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in GRAPH[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_no_import_cycles_among_the_project_modules():
    cycles = [(a, b) for a in GRAPH for b in GRAPH[a]
              if a in _reach(b) and not (a.startswith(b + ".") or b.startswith(a + "."))]
    assert not cycles, f"import cycles (a imports b, b reaches a): {cycles}"


def test_model_root_holds_only_the_network_its_weights_and_the_entry_points():
    root = sorted(p.stem for p in (REPO / "model").glob("*.py") if p.stem != "__init__")
    assert root == ["chameleon_lm", "export_hf", "lumina_layout", "make_tiny_bundle", "make_tiny_model",
                    "qk_norm", "sharded_load"]
    packages = sorted(p.parent.name for p in (REPO / "model").glob("*/__init__.py"))
    assert packages == ["generation", "tokenizer", "training"]


@pytest.mark.parametrize("package", ["model", "model.tokenizer", "model.training", "model.generation", "data",
                                     "data.inputs"])
def test_each_package_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and "import" in doc, f"{package}/__init__.py needs a docstring saying what it may import"
    for p in MODULES[package].parent.glob("*.py"):  # every module of the package is named in it
        assert p.name == "__init__.py" or p.name in doc, f"{package}: {p.name} is not in the package docstring"


def test_the_network_and_the_tokenizer_never_import_data():
    network = [m for m in MODULES if m.startswith("model.") and m.count(".") == 1 and m != "model.export_hf"]
    network += [m for m in MODULES if m.startswith("model.tokenizer")]
    for m in network:
        bad = {r for r in _reach(m) if r.startswith("data")}
        assert not bad, f"{m} reaches {bad}"


def test_nothing_under_model_reaches_the_training_data_path():
    for m in (m for m in MODULES if m.startswith("model")):
        assert not _reach(m) & TRAINING_DATA_PATH, f"{m} reaches {_reach(m) & TRAINING_DATA_PATH}"


def test_generation_uses_only_the_item_processor_of_data():
    direct = {i for m in MODULES if m.startswith("model.generation") for i in GRAPH[m] if i.startswith("data")}
    assert direct <= {"data.item_processor"}, direct


def test_training_machinery_never_imports_generation():
    for m in (m for m in MODULES if m.startswith("model.training")):
        assert not {r for r in _reach(m) if r.startswith("model.generation")}, m


def test_the_data_side_uses_only_the_tokenizer_of_the_model_side():
    for m in (m for m in MODULES if m.startswith("data")):
        bad = {r for r in _reach(m) if r.startswith("model") and not r.startswith("model.tokenizer")}
        assert not bad, f"{m} reaches {bad}"


@pytest.mark.parametrize("script", ["model/make_tiny_bundle.py", "model/make_tiny_model.py", "model/export_hf.py"])
def test_documented_model_entry_points_still_run_from_any_directory(script, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / script), "-h"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


def test_training_uses_of_data_only_its_project_neutral_helpers():
    direct = {i for m in MODULES if m.startswith("model.training") for i in GRAPH[m] if i.startswith("data")}
    assert direct <= {"data.files", "data.stop_signals"}, direct
