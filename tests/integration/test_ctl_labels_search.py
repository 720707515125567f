"""atomizerctl's label, archive, unarchive, ls --label/--archived and search, against a real
daemon (fake agent) over its socket: the whole path from the command line to the store."""

from __future__ import annotations

from tests.integration.test_ctl import ctl, ok, records
from tests.support.daemon import RunningDaemon


def test_label_archive_unarchive_ls_and_search(daemon: RunningDaemon) -> None:
    ok(daemon, "new", "--id", "a")
    ok(daemon, "new", "--id", "b")
    assert ok(daemon, "label", "a", "team=cfd", "env=prod") == "env=prod\nteam=cfd\n"
    assert ok(daemon, "label", "a", "env=") == "team=cfd\n"  # K= removes K
    bad = ctl(daemon, "label", "a", "Not_A.Domain/x=1")
    assert bad.returncode != 0 and "as in Kubernetes" in bad.stderr
    assert ctl(daemon, "label", "a", "novalue").returncode == 2

    def ids(*args: str) -> list[str]:
        return [line.split()[0] for line in ok(daemon, "ls", *args).splitlines()[1:]]

    assert ids("--label", "team=cfd") == ["a"]
    ok(daemon, "send", "b", "the turbine blade")
    assert ok(daemon, "archive", "b") == "b archived\n"
    assert ids() == ["a"]
    assert ids("--archived") == ["b"]
    assert ids("--all") == ["b", "a"]
    assert ok(daemon, "unarchive", "b") == "b unarchived\n"
    assert ids() == ["b", "a"]

    out = ok(daemon, "search", "turbine").splitlines()
    assert out[0].split() == ["SESSION", "MESSAGE", "ROLE", "TIME", "MATCH"]
    assert len(out) == 3 and all("[turbine]" in line for line in out[1:])
    hits = records(ok(daemon, "--json", "search", "turbine", "--session", "b"))
    assert {h["session_id"] for h in hits} == {"b"} and len(hits) == 2
    assert ok(daemon, "search", "turbine", "--label", "team=cfd").splitlines()[1:] == []
    malformed = ctl(daemon, "search", '"unclosed')
    assert malformed.returncode != 0 and "malformed" in malformed.stderr
