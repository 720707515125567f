"""atomizerctl's session commands: create, list, show, change, send to, answer, audit and watch
sessions, and the daemon's status."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from atomizer.v1 import session_pb2

from atomizer_client.client import Client, attachment_from_path
from atomizer_client.ctl_chat import approval_policy, run_turn
from atomizer_client.ctl_output import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Output,
    enum_short,
    one_line,
    proto_dict,
    usd,
    when,
)
from atomizer_client.ctl_render import TurnRenderer
from atomizer_client.errors import (
    AtomizerError,
)
from atomizer_client.events import (
    decider_name,
)


def cmd_new(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.create_session(
        mode="power" if args.power else None,
        study_id=args.study or "",
        session_id=args.id or "",
        budget_usd=args.budget,
        turn_budget_usd=args.turn_budget,
    )
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(s.session_id)
    return EXIT_OK


def _label_pairs(items: Sequence[str], *, empty_ok: bool = False) -> dict[str, str]:
    """k=v arguments (with `empty_ok`, `k=` too: remove k)."""
    labels = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or (not value and not empty_ok):
            raise ValueError(f"{item!r} is not a label: use key=value")
        labels[key] = value
    return labels


def cmd_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        labels = _label_pairs(args.label or [])
    except ValueError as e:
        out.error(str(e))
        return EXIT_USAGE
    sessions = client.list_sessions(
        study_id=args.study or "",
        state=args.state,
        host_id=args.host_id or "",
        labels=labels,
        archived_only=args.archived,
        include_archived=args.all,
    )
    if out.json:
        for s in sessions:
            out.record(proto_dict(s))
        return EXIT_OK
    rows = [_session_row(s) for s in sessions]
    header = ("SESSION", "MODE", "STATE", "STUDY", "MSGS", "COST", "LAST ACTIVE", "HOST", "TITLE")
    _table(out, header, rows)
    return EXIT_OK


def _session_row(s: Any) -> tuple[str, ...]:
    return (
        s.session_id,
        enum_short(s, "mode"),
        enum_short(s, "state"),
        s.study_id or "-",
        str(s.message_count),
        f"${s.total_cost_usd:.4f}",
        when(s.last_active_at),
        s.host_id or "-",
        s.title or "-",
    )


def _table(out: Output, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _show_session(out: Output, s: Any) -> None:
    if out.json:
        out.record(proto_dict(s))
        return
    mcp = ", ".join(f"{m.name} ({m.status})" for m in s.mcp_servers) or "-"
    pairs = [
        ("session", s.session_id),
        ("title", s.title or "-"),
        ("mode", enum_short(s, "mode")),
        ("state", enum_short(s, "state")),
        ("study", s.study_id or "-"),
        ("host", s.host_id or "-"),
        ("agent session", s.agent_session_id or "-"),
        ("created", when(s.created_at)),
        ("last active", when(s.last_active_at)),
        ("messages", str(s.message_count)),
        ("spent", usd(s.total_cost_usd)),
        ("budget", _budget(s.budget_usd, s.total_cost_usd)),
        ("turn budget", usd(s.turn_budget_usd) if s.turn_budget_usd > 0 else "none"),
        ("last seq", str(s.last_seq)),
        ("queued turns", str(s.queued_turns)),
        ("mcp servers", mcp),
        ("last usage", _usage(s)),
        ("plan", "-" if not s.plan else ""),
    ]
    _pairs(out, pairs)
    for line in s.plan.splitlines():  # the agent's plan, as it wrote it (Markdown)
        out.line("  " + line)


def _usage(s: Any) -> str:
    if not s.HasField("usage"):
        return "-"
    u = s.usage
    window = f" of {u.context_window}" if u.context_window else ""
    return (
        f"in {u.input_tokens} (+{u.cache_read_input_tokens} cached), out {u.output_tokens}; "
        f"context {u.context_tokens}{window} tokens"
        + (
            f"; turn about {usd(u.estimated_turn_cost_usd)} so far"
            if u.estimated_turn_cost_usd
            else ""
        )
    )


def _budget(cap: float, spent: float) -> str:
    if cap <= 0:
        return "none"
    if spent >= cap:
        return f"{usd(cap)} (reached: no more messages)"
    return f"{usd(cap)} ({usd(cap - spent)} left)"


def _pairs(out: Output, pairs: Iterable[tuple[str, str]]) -> None:
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        out.line(f"{k.ljust(width)}  {v}")


def cmd_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    _show_session(out, client.get_session(args.id))
    return EXIT_OK


def cmd_history(client: Client, args: argparse.Namespace, out: Output) -> int:
    # All on stdout: here the headers are part of the record, not activity beside a reply.
    for i, m in enumerate(client.get_history(args.id)):
        if out.json:
            out.record(proto_dict(m))
            continue
        status = enum_short(m, "status")
        extra = "" if status in ("complete", "unspecified") else f" ({status})"
        if m.aside:
            extra += " [aside: not part of the conversation]"
        if m.rolled_back:
            extra += " [rolled back]"
        if enum_short(m, "origin") not in ("client", "unspecified"):
            extra += f" [started by the agent: {enum_short(m, 'origin')}]"
        cost = f" · ${m.cost_usd:.4f}" if m.cost_usd else ""
        out.line(
            ("\n" if i else "")
            + f"── {enum_short(m, 'role')}{extra} · {when(m.created_at)}{cost} · #{m.message_id}"
        )
        for call in m.tool_calls:
            out.line(one_line(f"  ⏺ {call.name} {call.input_json}"))
        out.line(m.content)
    return EXIT_OK


def cmd_mode(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.switch_mode(args.id, args.mode)
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(f"{s.session_id}: mode {enum_short(s, 'mode')}")
    return EXIT_OK


def cmd_study(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.set_study_context(args.id, None if args.none else args.study)
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(f"{s.session_id}: study {s.study_id or '(none)'}")
    return EXIT_OK


def cmd_rm(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.terminate_session(args.id, purge=args.purge)
    if out.json:
        out.record({"session_id": args.id, "purged": args.purge, "session": s and proto_dict(s)})
    else:
        out.line(f"{'purged' if args.purge else 'closed'} {args.id}")
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    st = client.get_status()
    if out.json:
        out.record(proto_dict(st))
        return EXIT_OK
    r = st.last_reaper_pass
    reaper = (
        f"{when(r.finished_at)}: {r.processes_stopped} stopped, {r.sessions_purged} purged, "
        f"{r.errors} errors"
        if st.HasField("last_reaper_pass")
        else "-"
    )
    pairs = [
        ("version", st.version),
        ("started", when(st.started_at)),
        ("uptime", f"{st.uptime_seconds:.0f} s"),
        ("sessions", str(st.sessions_known)),
        ("live processes", f"{st.live_processes} of {st.pool_capacity}"),
        ("busy sessions", str(st.busy_sessions)),
        ("queued turns", str(st.queued_turns)),
        ("agent", f"{st.agent_command} {st.agent_version}".strip()),
        ("total cost", f"${st.total_cost_usd:.4f}"),
        ("last reaper pass", reaper),
        ("failing MCP servers", str(st.failing_mcp_servers)),
    ]
    for w in st.webhooks:
        state = f"FAILING since {when(w.failing_since)}: {w.last_error}" if w.failing else "ok"
        pairs.append(
            (
                f"webhook {w.name}",
                f"{w.url} {state}; {w.queued} queued, {w.delivered} delivered, "
                f"{w.failed} failed, {w.dropped} dropped",
            )
        )
    _pairs(out, pairs)
    return EXIT_OK


def cmd_daemon(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`daemon restart`: a planned restart, then waits until the next daemon serves."""
    before = client.get_status()
    answer = client.restart_daemon()
    if not out.json:
        what = "handing over" if answer.hand_over else "stopping"
        out.note(
            f"restarting atomizerd (pid {answer.pid}): {what} {answer.live_processes} agents, "
            f"{answer.busy_sessions} busy sessions"
        )
    deadline = time.monotonic() + args.wait
    while True:
        time.sleep(0.2)
        try:
            st = client.get_status(timeout=2.0)
        except AtomizerError:
            st = None
        if st is not None and st.started_at != before.started_at:
            break
        if time.monotonic() > deadline:
            out.error(f"the daemon did not come back within {args.wait:g} s")
            return EXIT_UNAVAILABLE
    assert st is not None
    if out.json:
        out.record(proto_dict(st))
        return EXIT_OK
    _pairs(
        out,
        [
            ("agents adopted", str(st.agents_adopted)),
            ("turns resumed", str(st.turns_resumed)),
            ("adoption", f"{st.adoption_seconds * 1000:.0f} ms"),
        ],
    )
    return EXIT_OK


def cmd_send(client: Client, args: argparse.Namespace, out: Output) -> int:
    from_stdin = args.text == "-"
    text = sys.stdin.read() if from_stdin else args.text
    policy = approval_policy(args, can_ask=not out.json and not from_stdin)
    try:
        files = [attachment_from_path(path) for path in args.attach]
    except (OSError, ValueError) as e:
        out.error(f"cannot attach: {e}")
        return EXIT_USAGE
    schema = args.schema or ""
    if schema.startswith("@"):
        try:
            schema = Path(schema[1:]).read_text(encoding="utf-8")
        except OSError as e:
            out.error(f"cannot read the schema: {e}")
            return EXIT_USAGE
    return run_turn(
        client, args.id, text, out, policy, files, steer=args.steer, output_schema=schema
    )


def cmd_approve(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _answer(client, args, out, allow=True)


def cmd_deny(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _answer(client, args, out, allow=False)


def _answer(client: Client, args: argparse.Namespace, out: Output, *, allow: bool) -> int:
    d = client.respond_to_permission(
        args.id,
        args.request_id,
        allow,
        message=getattr(args, "message", None) or "",
        remember=args.remember,
    )
    if out.json:
        out.record(proto_dict(d))
    else:
        kept = " (remembered for this session)" if args.remember else ""
        out.line(f"{'allowed' if d.allow else 'denied'} {args.request_id}{kept}")
    return EXIT_OK


def cmd_audit(client: Client, args: argparse.Namespace, out: Output) -> int:
    rows = []
    for a in client.list_audit_events(args.id):
        if out.json:
            out.record(proto_dict(a))
            continue
        kind = enum_short(a, "kind").replace("_", " ")
        permission = a.kind == session_pb2.AUDIT_KIND_PERMISSION
        outcome = ("allowed" if a.allow else "denied") if permission else "-"
        rows.append(
            (
                when(a.time),
                kind,
                a.tool_name or "-",
                outcome,
                decider_name(a.decider),
                one_line(a.detail, 60) or "-",
            )
        )
    if not out.json:
        _table(out, ("TIME", "KIND", "TOOL", "OUTCOME", "BY", "DETAIL"), rows)
    return EXIT_OK


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    stream = client.watch_session(args.id, after_seq=args.after)
    renderer = TurnRenderer(out, show_prompt=True, answer_hint=True)
    try:
        for ev in stream:
            renderer.show(ev)
    except KeyboardInterrupt:
        stream.cancel()
        out.end_line()
        return EXIT_INTERRUPTED
    out.error("the daemon ended the watch")
    return EXIT_UNAVAILABLE


def cmd_label(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        labels = _label_pairs(args.labels, empty_ok=not args.replace)
    except ValueError as e:
        out.error(str(e))
        return EXIT_USAGE
    s = client.set_labels(args.id, labels, replace=args.replace)
    if out.json:
        out.record(proto_dict(s))
    else:
        for key, value in sorted(s.labels.items()):
            out.line(f"{key}={value}")
    return EXIT_OK


def cmd_archive(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.archive_session(args.id)
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(f"{s.session_id} archived")
    return EXIT_OK


def cmd_unarchive(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.unarchive_session(args.id)
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(f"{s.session_id} unarchived")
    return EXIT_OK


def cmd_search(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        labels = _label_pairs(args.label or [])
    except ValueError as e:
        out.error(str(e))
        return EXIT_USAGE
    hits = client.search_messages(args.query, session_id=args.session or "", labels=labels)
    rows = []
    for i, h in enumerate(hits):
        if i >= args.limit:
            break
        if out.json:
            out.record(proto_dict(h))
            continue
        rows.append(
            (h.session_id, str(h.message_id), enum_short(h, "role"), when(h.created_at),
             one_line(h.snippet))
        )  # fmt: skip
    if not out.json:
        _table(out, ("SESSION", "MESSAGE", "ROLE", "TIME", "MATCH"), rows)
    return EXIT_OK
