"""The ContextBuilder: a bounded, safe summary of a study for the system prompt."""

from __future__ import annotations

import os
from pathlib import Path

from atomizerd.atomizer.prompt import ContextBuilder, history_seed
from atomizerd.store.db import MessageRecord


def study(tmp_path: Path) -> Path:
    s = tmp_path / "studies" / "beam"
    (s / "1_setup").mkdir(parents=True)
    (s / "1_setup" / "optimization_config.json").write_text('{"objective": "min mass"}')
    (s / "2_trials" / "trial_001").mkdir(parents=True)
    (s / "2_trials" / "trial_002").mkdir()
    (s / "3_results").mkdir()
    (s / "3_results" / "summary.md").write_text("# results")
    (s / "STUDY_REPORT.md").write_text("# Beam\nconverged after 40 trials")
    return s


def test_the_summary_names_the_study_its_config_trials_reports_and_report(tmp_path: Path) -> None:
    text = ContextBuilder().build("user", "beam", study(tmp_path))
    assert "Current study: beam" in text
    assert '{"objective": "min mass"}' in text
    assert "Trial folders: 2." in text
    assert "summary.md" in text
    assert "converged after 40 trials" in text
    assert "Mode: user" in text


def test_the_summary_stays_within_its_byte_budget(tmp_path: Path) -> None:
    s = study(tmp_path)
    (s / "STUDY_REPORT.md").write_text("é" * 1_000_000)
    for i in range(500):
        (s / f"file_{i:04}.dat").write_bytes(b"\0\xff" * 10)
    whole = ContextBuilder().build("power", "beam", s)
    assert len(whole.encode()) < 16 * 1024  # a 2 MB report is read only up to its head
    text = ContextBuilder(budget_bytes=2000).build("power", "beam", s)
    assert len(text.encode()) <= 2000
    assert text.endswith("[... truncated]")


def test_odd_files_never_break_the_summary(tmp_path: Path) -> None:
    s = study(tmp_path)
    (s / "STUDY_REPORT.md").write_bytes(b"\xff\xfe binary \x00 junk")
    os.symlink("/nonexistent/target", s / "dangling")
    text = ContextBuilder().build("user", "beam", s)
    assert "binary" in text


def test_symlinks_out_of_the_study_are_not_read(tmp_path: Path) -> None:
    s = study(tmp_path)
    secret = tmp_path / "secret.md"
    secret.write_text("TOP SECRET")
    (s / "STUDY_REPORT.md").unlink()
    os.symlink(secret, s / "STUDY_REPORT.md")
    text = ContextBuilder().build("user", "beam", s)
    assert "TOP SECRET" not in text


def test_no_study_is_said_plainly() -> None:
    assert "No study is attached" in ContextBuilder().build("user", None, None)


def test_the_history_seed_quotes_the_last_messages() -> None:
    def msg(i: int, role: str, text: str) -> MessageRecord:
        return MessageRecord(i, "s", "t", role, text, "complete", None, [], 0.0, {}, "", 0.0)

    seed = history_seed([msg(1, "user", "hello"), msg(2, "assistant", "hi there")])
    assert "[user] hello" in seed and "[assistant] hi there" in seed
    assert history_seed([]) == ""
