"""The rules are pure: no broker, database, web or metrics library reaches them, even indirectly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BANNED = ("aiokafka", "asyncpg", "fastapi", "starlette", "uvicorn", "prometheus_client")
PURE_DIRS = [ROOT / "schemas", *sorted(ROOT.glob("services/*/core"))]
PURE_FILES = sorted(p for d in PURE_DIRS for p in d.rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_pure_modules_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PURE_FILES}
    assert "services/dosage/core/visit.py" in names
    assert "services/geofence/core/index.py" in names


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pure_module_imports_no_io_library(path: Path) -> None:
    assert not (_imported_roots(path) & set(BANNED))


def test_pure_modules_pull_in_no_io_library_transitively() -> None:
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in PURE_FILES
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(','.join(sorted(b for b in {BANNED!r} if b in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_the_check_itself_catches_a_banned_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from aiokafka import AIOKafkaConsumer\nimport asyncpg.pool\n")
    assert _imported_roots(bad) & set(BANNED) == {"aiokafka", "asyncpg"}
