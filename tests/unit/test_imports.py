"""Processes talk only through Kafka topics (and the files they export), never by importing each
other: a module of one process package (streams, spark, speed, visualizer) imports no other
process package, not even inside a function. recsys/ (the spine) may reach a process only lazily,
inside a function (the CLI's dispatch, the demo); schemas/ (the contracts) imports none.
bench/ and tests/ may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("streams", "spark", "speed", "visualizer")
SHARED = ("recsys", "schemas")


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) of every import in the file, relative ones
    resolved against the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    stem = package[: len(package) - child.level + 1]
                    base = ".".join([*stem, base] if base else stem)
                found.append((base, child.lineno, top))
            visit(child, inner)

    visit(tree, True)
    return found


def breaches(root: Path = ROOT) -> list[str]:
    """One line per import that crosses from one process package into another."""
    out = []
    for package in PROCESSES + SHARED:
        for path in sorted((root / package).rglob("*.py")):
            module = _module(path, root)
            for name, line, top in imports(path, root):
                target = name.split(".")[0]
                if target not in PROCESSES or target == package:
                    continue
                if package == "recsys" and not top:
                    continue  # the spine dispatches lazily
                where = "at module level" if package == "recsys" else "imports"
                out.append(f"{module} (line {line}) {where} {name}")
    return out


def test_no_process_package_imports_another():
    assert breaches() == []


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path):
    for package in ("spark", "recsys"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "spark" / "x.py").write_text(
        "import os\nfrom . import y\n\ndef f():\n    from streams.producer import P\n"
        "    return P\n")
    (tmp_path / "recsys" / "cli.py").write_text(
        "import spark.job\n\ndef main():\n    from streams import app\n")
    found = imports(tmp_path / "spark" / "x.py", tmp_path)
    assert ("os", 1, True) in found
    assert ("spark", 2, True) in found  # `from . import y` in spark/x.py
    assert ("streams.producer", 5, False) in found
    assert breaches(tmp_path) == ["spark.x (line 5) imports streams.producer",
                                  "recsys.cli (line 1) at module level spark.job"]
