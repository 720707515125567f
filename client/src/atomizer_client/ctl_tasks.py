"""atomizerctl's task commands (`tasks`, `stop-task`, `task-output`) and how a turn's task
events are shown (`send`, `chat`, `watch`).

Tasks are what the agent runs on its own: background or long commands and subagents. They show
up as task_started / task_output / task_ended events, also between turns, and a task that ends
usually makes the agent start a turn by itself (TurnStarted.origin "task").
"""

from __future__ import annotations

import argparse
import codecs
from collections.abc import Callable, Sequence
from typing import Any

from atomizer.v1 import session_pb2

from atomizer_client.client import Client
from atomizer_client.ctl_output import EXIT_OK, Output, one_line, proto_dict, when
from atomizer_client.events import Event, TaskEnded, TaskOutput, TaskStarted, TurnStarted

PAGE_BYTES = 64 * 1024
"""How much `task-output` asks for per call when no --limit is given (it reads every page)."""

_ENDED = {"completed": "✓", "failed": "✗", "stopped": "■", "killed": "✗"}


# --- events --------------------------------------------------------------------------------


def origin_note(ev: TurnStarted) -> str:
    """The line that marks a turn the agent started on its own."""
    return f"[turn started by the agent: {ev.origin}]"


def task_started_note(ev: TaskStarted) -> str:
    where = "background " if ev.background else ""
    return one_line(f"⧗ {where}{ev.kind} task {ev.task_id} started: {ev.description}")


def task_ended_note(ev: TaskEnded) -> str:
    mark = _ENDED.get(ev.status, "·")
    summary = f": {ev.summary}" if ev.summary else ""
    return one_line(f"{mark} task {ev.task_id} {ev.status}{summary}")


def task_output_notes(ev: TaskOutput) -> list[str]:
    """One line per line of output, each naming its task."""
    return [f"  [{ev.task_id}] {line}" for line in ev.text.rstrip("\n").splitlines()]


def task_handlers(out: Output) -> dict[type[Event], Callable[[Any], None]]:
    """TurnRenderer's handlers of the task events: dim activity lines on stderr."""

    def output(ev: TaskOutput) -> None:
        for line in task_output_notes(ev):
            out.note(line)

    return {
        TaskStarted: lambda ev: out.note(task_started_note(ev)),
        TaskOutput: output,
        TaskEnded: lambda ev: out.note(task_ended_note(ev)),
    }


# --- commands ------------------------------------------------------------------------------


def cmd_tasks(client: Client, args: argparse.Namespace, out: Output) -> int:
    """The session's running tasks, oldest first."""
    s = client.get_session(args.id)
    if out.json:
        for t in s.tasks:
            out.record(proto_dict(t))
        return EXIT_OK
    if not s.tasks:
        out.note(f"{s.session_id}: no running tasks")
        return EXIT_OK
    rows = [
        (
            t.task_id,
            _kind(t.kind),
            "yes" if t.background else "no",
            when(t.started_at),
            f"{t.output_bytes:,}",
            one_line(t.description, 60) or "-",
        )
        for t in s.tasks
    ]
    _table(out, ("TASK", "KIND", "BACKGROUND", "STARTED", "OUTPUT", "DESCRIPTION"), rows)
    return EXIT_OK


def cmd_stop_task(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.stop_task(args.id, args.task_id)
    if out.json:
        out.record({"session_id": args.id, "task_id": args.task_id, "stopped": True})
    else:
        out.line(f"stopped {args.task_id}")
    return EXIT_OK


def cmd_task_output(client: Client, args: argparse.Namespace, out: Output) -> int:
    """A task's output from --offset: one page of --limit bytes, else all of it so far."""
    offset = args.offset
    # A page may end inside a UTF-8 character: decode across pages.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        limit = args.limit or PAGE_BYTES
        page = client.get_task_output(args.id, args.task_id, offset=offset, limit=limit)
        if out.json:
            out.record(
                {
                    "task_id": args.task_id,
                    "offset": offset,
                    "next_offset": page.next_offset,
                    "size": page.size,
                    "running": page.running,
                    "text": page.data.decode("utf-8", errors="replace"),
                }
            )
        else:
            out.text(decoder.decode(page.data))
        done = args.limit or not page.data or page.next_offset <= offset
        offset = page.next_offset
        if done or offset >= page.size:
            break
    if not out.json:
        out.text(decoder.decode(b"", final=True))
        out.end_line()
        if page.running or offset < page.size:
            state = "still runs" if page.running else "has more"
            out.note(
                f"[{args.task_id} {state}: {page.size:,} bytes so far; "
                f"read on with --offset {offset}]"
            )
    return EXIT_OK


# --- arguments -----------------------------------------------------------------------------


def add_commands(add: Callable[[str, Any, str], argparse.ArgumentParser]) -> None:
    """The task commands, added with build_parser's `add(name, fn, help)`."""
    p = add("tasks", cmd_tasks, "list a session's running tasks (background commands, subagents)")
    p.add_argument("id")
    p = add("stop-task", cmd_stop_task, "stop one of a session's running tasks")
    p.add_argument("id")
    p.add_argument("task_id", help="the task's id (see `tasks`)")
    p = add(
        "task-output",
        cmd_task_output,
        "print a task's output (running or recently ended), all of it so far or one page",
    )
    p.add_argument("id")
    p.add_argument("task_id", help="the task's id (see `tasks`)")
    p.add_argument(
        "--offset", type=_count, default=0, metavar="N", help="start at byte N (default 0)"
    )
    p.add_argument(
        "--limit",
        type=_count,
        default=0,
        metavar="N",
        help="print one page of at most N bytes (default: everything so far)",
    )


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value!r}")
    return n


# --- formatting ----------------------------------------------------------------------------


def _table(out: Output, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _kind(value: session_pb2.TaskKind.ValueType | int) -> str:
    try:
        name = session_pb2.TaskKind.Name(session_pb2.TaskKind.ValueType(value))
        return name.removeprefix("TASK_KIND_").lower()
    except ValueError:  # a kind from a newer contract
        return str(value)
