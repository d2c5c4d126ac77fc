"""The documentation site builds with warnings as errors: every page in the nav, no broken link or anchor, every
API entry found in the code (mkdocstrings reads the docstrings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strict_with_the_api_reference(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "api" / "index.html").read_text()
    for name in ("Scope", "Gates", "KeyMass", "Results", "gradient_importance", "ablation_importance"):
        assert name in api, name
    pages = {p.relative_to(ROOT / "docs").with_suffix("") for p in (ROOT / "docs").rglob("*.md")} - {Path("index")}
    built = {p.parent.relative_to(tmp_path) for p in tmp_path.rglob("index.html")}
    assert pages <= built, pages - built
