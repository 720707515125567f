"""atomizerctl and tool approval: --yes/--no, approve/deny from another process, the audit
trail, and spending caps. (Answering at the terminal's prompt: test_ctl_chat_tmux.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration import test_grpcurl
from tests.integration.test_ctl import CTL, ctl, ctl_env, ok, read_until, records
from tests.support.daemon import RunningDaemon

# [[ask:Bash]] asks to use Bash before the reply, which then says "permission Bash: allow" (or
# "deny (<message>)"); the slow reply keeps the turn running a while after the answer.
ASK = "[[ask:Bash]] hi"
ASK_SLOW = "[[ask:Bash]] [[slow:200]] hi there"


def test_yes_allows_and_no_denies_without_asking(shared_daemon: RunningDaemon) -> None:
    sid = ok(shared_daemon, "new").strip()
    allowed = ctl(shared_daemon, "send", sid, ASK, "--yes")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == "echo: hi\npermission Bash: allow\n"
    assert "? permission for Bash" in allowed.stderr and "use Bash" in allowed.stderr
    assert "✓ allowed Bash by client" in allowed.stderr
    denied = ctl(shared_daemon, "send", sid, ASK, "--no")
    assert denied.returncode == 0, denied.stderr
    assert "permission Bash: deny (the user denied this tool use)" in denied.stdout
    assert "✗ denied Bash by client" in denied.stderr
    assert ctl(shared_daemon, "send", sid, ASK, "--yes", "--no").returncode == 2

    lines = ok(shared_daemon, "audit", sid).splitlines()
    assert lines[0].split() == ["TIME", "KIND", "TOOL", "OUTCOME", "BY", "DETAIL"]
    assert [line.split()[2:6] for line in lines[1:]] == [
        ["permission", "Bash", "allowed", "client"],
        ["permission", "Bash", "denied", "client"],
    ]
    trail = records(ok(shared_daemon, "--json", "audit", sid))
    assert [(a["tool_name"], a["allow"], a["decider"]) for a in trail] == [
        ("Bash", True, "DECIDER_CLIENT"),
        ("Bash", False, "DECIDER_CLIENT"),
    ]
    assert trail[1]["detail"] == "the user denied this tool use"


def test_json_send_with_yes_prints_both_permission_events(shared_daemon: RunningDaemon) -> None:
    sid = ok(shared_daemon, "new").strip()
    events = records(ok(shared_daemon, "--json", "send", sid, ASK, "--yes"))
    request = next(e for e in events if e["type"] == "permission_request")
    assert request["tool_name"] == "Bash" and request["deadline"] and request["request_id"]
    decided = [e for e in events if e["type"] == "permission_decided"]
    assert [(d["request_id"], d["allow"], d["decider"]) for d in decided] == [
        (request["request_id"], True, "client")
    ]
    assert "permission Bash: allow" in events[-1]["text"]


def _waiting_send(d: RunningDaemon, sid: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`send --json` of a message that asks, its stdin not a terminal: it prints the request
    and waits for an answer from elsewhere. Returns the process and the request."""
    proc = subprocess.Popen(
        [str(CTL), "--socket", str(d.socket), "--json", "send", sid, ASK_SLOW],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ctl_env(),
    )
    seen = read_until(proc, b'"permission_request"')
    line = next(x for x in seen.decode().splitlines() if '"permission_request"' in x)
    return proc, json.loads(line)


def test_approve_from_another_process_while_send_waits(shared_daemon: RunningDaemon) -> None:
    sid = ok(shared_daemon, "new").strip()
    proc, request = _waiting_send(shared_daemon, sid)
    try:
        approved = ctl(shared_daemon, "approve", sid, request["request_id"])
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout == f"allowed {request['request_id']}\n"
        again = ctl(shared_daemon, "deny", sid, request["request_id"])  # the turn still runs
        assert again.returncode == 4 and "already decided" in again.stderr
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(x) for x in out.decode().splitlines() if x]
    decided = [e for e in events if e["type"] == "permission_decided"]
    assert [(d["allow"], d["decider"]) for d in decided] == [(True, "client")]
    assert events[-1]["type"] == "turn_completed"
    assert "permission Bash: allow" in events[-1]["text"]


def test_deny_from_another_process_with_a_message(shared_daemon: RunningDaemon) -> None:
    sid = ok(shared_daemon, "new").strip()
    proc, request = _waiting_send(shared_daemon, sid)
    try:
        denied = ctl(
            shared_daemon, "--json", "deny", sid, request["request_id"], "--message", "no way"
        )
        assert denied.returncode == 0, denied.stderr
        (decision,) = records(denied.stdout)
        assert (decision["allow"], decision["decider"]) == (False, "DECIDER_CLIENT")
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = json.loads(out.decode().splitlines()[-1])
    assert "permission Bash: deny (no way)" in last["text"]
    assert records(ok(shared_daemon, "--json", "audit", sid))[0]["detail"] == "no way"


def test_without_a_terminal_the_request_is_shown_and_the_timeout_decides(
    short_tmp: Path,
) -> None:
    with RunningDaemon(short_tmp, {"approvals": {"timeout": 0.5}}) as d:
        sid = ok(d, "new").strip()
        sent = ctl(d, "send", sid, ASK)  # stdin is a pipe: nothing is asked
        assert sent.returncode == 0, sent.stderr
        assert f"atomizerctl approve {sid} " in sent.stderr  # how to answer from elsewhere
        assert "✗ denied Bash by timeout" in sent.stderr
        assert "permission Bash: deny (nobody answered" in sent.stdout
        assert ok(d, "audit", sid).splitlines()[1].split()[2:6] == [
            "permission",
            "Bash",
            "denied",
            "timeout",
        ]


@pytest.mark.skipif(not test_grpcurl.GRPCURL.exists(), reason="grpcurl missing")
def test_the_documented_grpcurl_answer_and_audit_commands_work(
    shared_daemon: RunningDaemon,
) -> None:
    sid = ok(shared_daemon, "new").strip()
    proc, request = _waiting_send(shared_daemon, sid)
    try:
        command = test_grpcurl.doc_command("/RespondToPermission", '"allow": true')
        command = command.replace('"RID"', json.dumps(request["request_id"]))
        answered = test_grpcurl.run(shared_daemon, command, sid)
        assert answered.returncode == 0, answered.stderr
        decision = json.loads(answered.stdout)["decision"]
        assert (decision["allow"], decision["decider"]) == (True, "DECIDER_CLIENT")
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "permission Bash: allow" in json.loads(out.decode().splitlines()[-1])["text"]
    trail = test_grpcurl.run(shared_daemon, test_grpcurl.doc_command("/ListAuditEvents"), sid)
    assert json.loads(trail.stdout)["events"][0]["decider"] == "DECIDER_CLIENT"
    denial = test_grpcurl.doc_command("/RespondToPermission", '"allow": false')
    gone = test_grpcurl.run(shared_daemon, denial.replace('"RID"', '"r"'), sid)
    assert gone.returncode == 64 + 5 and "NotFound" in gone.stderr  # nothing pending


def test_answering_a_request_that_is_not_pending(shared_daemon: RunningDaemon) -> None:
    sid = ok(shared_daemon, "new").strip()
    unknown = ctl(shared_daemon, "approve", sid, "no-such-request", "--remember")
    assert unknown.returncode == 3 and "NOT_FOUND" in unknown.stderr
    assert ctl(shared_daemon, "deny", "no-such-session", "r").returncode == 3
    assert ctl(shared_daemon, "audit", "no-such-session").returncode == 3
    assert ok(shared_daemon, "audit", sid).splitlines()[1:] == []  # nothing decided yet


def test_budgets_show_in_show_and_a_spent_session_refuses_messages(
    shared_daemon: RunningDaemon,
) -> None:
    sid = ok(shared_daemon, "new", "--budget", "0.0001", "--turn-budget", "0.00005").strip()
    shown = dict(line.split(None, 1) for line in ok(shared_daemon, "show", sid).splitlines())
    assert shown["spent"] == "$0.0000"
    assert shown["budget"] == "$0.0001 ($0.0001 left)"
    assert ok(shared_daemon, "--json", "show", sid).count('"turn_budget_usd": 5e-05') == 1
    stopped = ctl(shared_daemon, "send", sid, "spend")  # crosses its turn's cap mid-turn
    assert stopped.returncode == 130 and "(turn_budget_usd)" in stopped.stderr, stopped.stderr
    refused = ctl(shared_daemon, "send", sid, "and more")
    assert refused.returncode == 7 and "has spent" in refused.stderr
    assert "(reached" in ok(shared_daemon, "show", sid)
    assert ctl(shared_daemon, "new", "--budget", "-1").returncode == 2
    assert ctl(shared_daemon, "new", "--budget", "lots").returncode == 2


def test_help_describes_approval() -> None:
    top = subprocess.run([str(CTL), "--help"], capture_output=True, text=True, env=ctl_env())
    for word in ("approve", "deny", "audit", "allow? [y/N/a(lways)]", "--yes", "approvals.timeout"):
        assert word in top.stdout
    send = subprocess.run(
        [str(CTL), "send", "--help"], capture_output=True, text=True, env=ctl_env()
    )
    assert "--yes" in send.stdout and "--no" in send.stdout
    new = subprocess.run([str(CTL), "new", "--help"], capture_output=True, text=True, env=ctl_env())
    assert "--budget" in new.stdout and "--turn-budget" in new.stdout
