"""The floors stay one-way: the core (capture, models, results, plotting) imports no analysis or probe, and no
analysis imports another (the helpers two analyses share live in probes/ or the core)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = [*sorted((ROOT / "headscope" / "capture").glob("*.py")), *sorted((ROOT / "headscope" / "models").glob("*.py")),
        ROOT / "headscope" / "results.py", ROOT / "headscope" / "plotting.py", ROOT / "headscope" / "errors.py",
        ROOT / "headscope" / "progress.py"]
ANALYSES = sorted(p for p in (ROOT / "analyses").glob("*.py") if p.name != "__init__.py")
PARTS = {"sinks": {"sinks_vlm", "sink_reducers"}}  # the vision-language half and the reducers of sinks


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_no_analysis_or_probe(path: Path) -> None:
    above = sorted(n for n in imported(path) if n.startswith(("headscope.analyses", "headscope.probes")))
    assert not above, f"{path.relative_to(ROOT)} imports {above}"


@pytest.mark.parametrize("path", ANALYSES, ids=lambda p: p.stem)
def test_no_analysis_imports_another(path: Path) -> None:
    others = {p.stem for p in ANALYSES} - {path.stem} - PARTS.get(path.stem, set())
    found = sorted(n for n in imported(path) for other in others
                   if n in (f"headscope.analyses.{other}",) or n.startswith(f"headscope.analyses.{other}."))
    assert not found, f"analysis {path.stem} imports {found}: move what they share below both"
