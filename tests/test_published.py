"""Published findings as a regression suite: each finding of :mod:`headscope.published`, run on the packaged models,
must give every claim the outcome recorded for it (a test per finding, slow); and ``headscope reproduce`` reports,
writes the page and the JSON, and refuses bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli

from headscope import published
from headscope.published import Claim, Finding, Row

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(published.FINDINGS))
def test_the_finding_reproduces_as_recorded(name: str) -> None:
    one = published.FINDINGS[name].reproduce()
    assert one.rows and one.claims
    assert all(row.measured and row.paper for row in one.rows)
    wrong = [f"{claim.text}: holds={claim.holds}, recorded {claim.expected} ({claim.measured})"
             for claim in one.claims if not claim.as_expected]
    assert not wrong, "\n".join(wrong)
    # a claim recorded as not reproducing says why, and every claim shows the numbers it was judged on
    assert all(claim.why for claim in one.claims if not claim.expected)
    assert all(any(ch.isdigit() for ch in claim.measured) for claim in one.claims)


def test_the_page_holds_the_generated_block_and_every_finding() -> None:
    page = (ROOT / "docs" / "published.md").read_text(encoding="utf-8")
    block = page.split(published.START, 1)[1].split(published.END, 1)[0]
    for finding in published.FINDINGS.values():
        assert f"### {published._text(finding.title)}" in block
        assert f"`{published.command(finding.name)}`" in block
    assert "could not be measured" not in block and "| headscope |" in block


def _toy(holds: bool, expected: bool = True, token: str = "<bos>") -> Finding:
    """A finding with given outcomes, for the command's own behaviour (the real ones are slow)."""
    def measure():
        rows = [Row("quantity", "paper model", "1.0", "toy", f"2.0 on {token!r} | a*b")]
        return rows, [Claim("the toy claim", np.bool_(holds), "2.0 vs 1.0", expected,
                            "" if expected else "a toy reason")]

    return Finding("toy", "A toy finding", "Nobody 2026", "Nothing; `code` stays code.", measure)


def _broken() -> Finding:
    def measure():
        raise RuntimeError("the model is not installed")

    return Finding("broken", "A broken finding", "Nobody 2026", "Nothing.", measure)


@pytest.fixture
def toy_findings(monkeypatch: pytest.MonkeyPatch):
    def use(*findings: Finding) -> None:
        monkeypatch.setattr(published, "FINDINGS", {f.name: f for f in findings})

    return use


def test_render_escapes_measured_token_strings_and_keeps_written_code() -> None:
    block = published.render([_toy(True).reproduce()], "2026-01-01")
    assert "&lt;bos&gt;" in block and "<bos>" not in block
    assert "\\| a\\*b" in block  # the table's separator and Markdown's emphasis, escaped in a measured cell
    assert "`code` stays code" in block
    assert "- **reproduces**: the toy claim: 2.0 vs 1.0." in block


def test_reproduce_writes_json_and_the_page_and_exits_0_when_all_is_as_recorded(
        toy_findings, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    toy_findings(_toy(False, expected=False))
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nkept\n\n{published.START}\nold numbers\n{published.END}\n\nafter\n", encoding="utf-8")
    out = tmp_path / "findings.json"
    assert run_cli("reproduce", "--docs", str(page), "--json", str(out)) == 0
    text = page.read_text(encoding="utf-8")
    assert "old numbers" not in text and text.startswith("# Title\n\nkept\n") and text.endswith("after\n")
    assert "- **does not reproduce**: the toy claim: 2.0 vs 1.0 (a toy reason)." in text
    [entry] = json.loads(out.read_text(encoding="utf-8"))
    assert entry["name"] == "toy" and entry["as_expected"] is True and entry["error"] is None
    assert entry["claims"][0] == {"text": "the toy claim", "holds": False, "measured": "2.0 vs 1.0",
                                  "expected": False, "why": "a toy reason", "as_expected": True}
    assert entry["command"] == "headscope reproduce toy"
    assert "does not reproduce: the toy claim: 2.0 vs 1.0" in capsys.readouterr().out


def test_a_claim_not_as_recorded_or_a_broken_finding_exits_1_and_the_others_still_run(
        toy_findings, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    toy_findings(_broken(), _toy(False))
    out = tmp_path / "findings.json"
    assert run_cli("reproduce", "--json", str(out)) == 1
    broken, toy = json.loads(out.read_text(encoding="utf-8"))
    assert broken["error"] == "RuntimeError: the model is not installed" and broken["as_expected"] is False
    assert toy["claims"][0]["holds"] is False and toy["as_expected"] is False
    captured = capsys.readouterr()
    assert "[NOT AS RECORDED]" in captured.out
    assert "not as recorded: broken, toy" in captured.err


@pytest.mark.parametrize(("args", "words"), [
    (("reproduce", "no-such-finding"), "no published finding named no-such-finding: choose from toy"),
    (("reproduce", "toy", "--docs", "docs/published.md"), "--docs rewrites the whole page"),
    (("reproduce", "--docs", "missing/page.md"), "folder missing does not exist"),
    (("reproduce", "--docs", "README.txt"), "no page README.txt"),
])
def test_bad_input_is_one_line_and_exit_2(toy_findings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture, args, words) -> None:
    toy_findings(_toy(True), _broken())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "published.md").write_text("no markers", encoding="utf-8")
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err


def test_a_page_without_the_markers_is_refused(toy_findings, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    toy_findings(_toy(True))
    page = tmp_path / "page.md"
    page.write_text("no markers here\n", encoding="utf-8")
    assert run_cli("reproduce", "--docs", str(page)) == 2
    assert "has no <!-- published:start --> ... <!-- published:end --> block" in capsys.readouterr().err
    assert page.read_text(encoding="utf-8") == "no markers here\n"
