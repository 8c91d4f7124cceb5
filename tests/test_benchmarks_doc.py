"""BENCHMARKS.md's tables are generated from bench/results.json (bench/tables.py); its prose
is written by hand. A table edited by hand, or figures re-measured without regenerating
the tables, fail here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "bench" / "tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_block_is_generated_and_current() -> None:
    tables = load_tables()
    doc = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    results = json.loads((ROOT / "bench" / "results.json").read_text(encoding="utf-8"))
    named = [m["name"] for m in tables.BLOCK.finditer(doc)]
    assert sorted(named) == sorted(tables.TABLES), "a table has no block, or a block no table"
    assert tables.render(doc, results) == doc, "run: uv run python bench/tables.py"


def test_no_table_outside_a_generated_block() -> None:
    doc = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    outside = load_tables().BLOCK.sub("", doc)
    assert [line for line in outside.splitlines() if line.lstrip().startswith("|")] == []
