"""The ContextBuilder: a bounded, safe summary of a study for the system prompt."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atomizerd.atomizer import prompt
from atomizerd.atomizer.prompt import ContextBuilder, history_seed
from atomizerd.model import MessageRecord


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


# --- bounded work, and a cache ---------------------------------------------------------------


class CountingScandir:
    """The prompt module's scandir, counting the folders opened and the entries read."""

    def __init__(self) -> None:
        self.opened = 0
        self.entries = 0

    def __call__(self, path: str) -> Any:
        self.opened += 1
        inner = _real_scandir(path)
        counter = self

        class Counted:
            def __enter__(self) -> Counted:
                return self

            def __exit__(self, *exc: object) -> None:
                inner.close()

            def __iter__(self) -> Iterator[os.DirEntry[str]]:
                for entry in inner:
                    counter.entries += 1
                    yield entry

        return Counted()


_real_scandir = os.scandir


def age(root: Path, seconds: float = 3600) -> None:
    """Everything under `root` last changed `seconds` ago (a summary of just-changed files
    is not cached: their mtimes could hide a further change)."""
    past = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (past, past), follow_symlinks=False)
    os.utime(root, (past, past))


def test_a_study_of_100k_files_gets_a_capped_summary_from_a_bounded_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = study(tmp_path)
    for i in range(100_000):
        os.close(os.open(s / f"sample_{i:06}.dat", os.O_CREAT | os.O_WRONLY, 0o600))
    for i in range(3000):
        (s / "2_trials" / f"run_{i:04}").mkdir()
    scandir = CountingScandir()
    monkeypatch.setattr(prompt, "scandir", scandir)

    text = ContextBuilder().study_summary("beam", s)

    # Every folder is read only up to its cap, and the whole summary up to its total.
    assert scandir.entries <= prompt._SCAN_TOTAL + prompt._TRIALS_SCAN
    assert scandir.entries < 20_000
    files = text.split("Files:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(files) <= prompt._TREE_ENTRIES + 1
    assert "summarized in part: the study folder" in text
    assert "converged after 40 trials" in text  # what is read by name is still there


def test_a_second_summary_of_an_unchanged_study_reads_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = study(tmp_path)
    age(s)
    scandir = CountingScandir()
    monkeypatch.setattr(prompt, "scandir", scandir)
    builder = ContextBuilder()

    first = builder.build("user", "beam", s)
    walked = scandir.opened
    assert walked > 0
    second = builder.build("power", "beam", s)  # another mode, the same study
    assert second.split("Current study:")[1] == first.split("Current study:")[1]
    assert scandir.opened == walked  # served from the cache

    (s / "3_results" / "fresh.md").write_text("# a new report")  # a listed folder changed
    third = builder.build("user", "beam", s)
    assert "fresh.md" in third
    assert scandir.opened > walked


def test_a_changed_report_or_an_expired_entry_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = study(tmp_path)
    age(s)
    builder = ContextBuilder()
    assert "converged after 40 trials" in builder.build("user", "beam", s)
    (s / "STUDY_REPORT.md").write_text("# Beam\nrestarted with a new mesh")
    assert "restarted with a new mesh" in builder.build("user", "beam", s)

    age(s)
    builder = ContextBuilder(cache_ttl=0.0)
    builder.build("user", "beam", s)
    scandir = CountingScandir()
    monkeypatch.setattr(prompt, "scandir", scandir)
    builder.build("user", "beam", s)
    assert scandir.opened > 0  # no cache without a time to live
