"""Guard: every test folder is one pytest actually collects.

pytest's default ``norecursedirs`` skips folders named like build outputs (``dist``, ``build``,
``venv``, ...); a test folder with such a name is silently never run. This happened once."""

from pathlib import Path

SKIPPED_BY_PYTEST = {"dist", "build", "venv", "node_modules", "CVS", "_darcs", "{arch}"}


def test_no_test_folder_is_skipped_by_pytest():
    tests = Path(__file__).resolve().parents[1]
    folders = [p for p in tests.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    bad = [str(p.relative_to(tests)) for p in folders
           if p.name in SKIPPED_BY_PYTEST or p.name.startswith(".") or p.name.endswith(".egg")]
    assert not bad, f"pytest would never collect tests under: {bad}"
    assert any(p.name == "distributed" for p in folders)
