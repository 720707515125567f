"""atomizerctl's commands beside the conversation: `aside` (a question aside), `rename` (the
session's title), `mcp` (the live agent's MCP servers: health, reconnect, enable/disable), and
undoing: `rewind` (the agent's file changes), `rollback` and `undo-rollback`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from atomizer_client.client import Client
from atomizer_client.ctl_output import EXIT_INVALID, EXIT_OK, Output, proto_dict


def cmd_aside(client: Client, args: argparse.Namespace, out: Output) -> int:
    """The answer on stdout as it comes; it never becomes part of the conversation."""
    for part in client.ask_aside(args.id, args.text):
        if out.json:
            out.record(proto_dict(part))
        else:
            out.text(part.text)
    if not out.json:
        out.end_line()
    return EXIT_OK


def cmd_rename(client: Client, args: argparse.Namespace, out: Output) -> int:
    s = client.rename_session(args.id, args.title)
    if out.json:
        out.record(proto_dict(s))
    else:
        out.line(f"{s.session_id}: {s.title}")
    return EXIT_OK


def cmd_mcp(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.reconnect:
        servers = [client.reconnect_mcp_server(args.id, args.reconnect)]
    elif args.enable or args.disable:
        servers = [
            client.set_mcp_server_enabled(args.id, args.enable or args.disable, bool(args.enable))
        ]
    else:
        servers = client.get_mcp_status(args.id)
    for m in servers:
        if out.json:
            out.record(proto_dict(m))
            continue
        origin = "" if m.configured else " (not configured by the daemon)"
        error = f": {m.error}" if m.error else ""
        out.line(f"{m.name}  {m.status}  {m.tools_count} tools{origin}{error}")
    return EXIT_OK


def cmd_rewind(client: Client, args: argparse.Namespace, out: Output) -> int:
    r = client.rewind_files(args.id, args.message_id, dry_run=args.dry_run, force=args.force)
    if out.json:
        out.record(proto_dict(r))
        return EXIT_OK
    conflicts = set(r.conflicts)
    for path in r.files:
        out.line(f"{path}{'  (changed by someone else since)' if path in conflicts else ''}")
    if r.rewound:
        out.note(f"{len(r.files)} file(s) restored")
    elif conflicts and not args.dry_run:
        out.error("nothing rewound: files were changed by someone else since (--force rewinds)")
        return EXIT_INVALID
    else:
        out.note(f"dry run: {len(r.files)} file(s), +{r.insertions} -{r.deletions} lines")
    return EXIT_OK


def cmd_rollback(client: Client, args: argparse.Namespace, out: Output) -> int:
    r = client.rollback_session(args.id, args.message_id, rewind_files=args.files)
    if out.json:
        out.record(proto_dict(r))
    else:
        out.line(f"{r.session.session_id}: {r.rolled_back} message(s) rolled back")
        for path in r.files:
            out.line(f"  restored {path}")
    return EXIT_OK


def cmd_undo_rollback(client: Client, args: argparse.Namespace, out: Output) -> int:
    r = client.undo_rollback(args.id)
    if out.json:
        out.record(proto_dict(r))
    else:
        out.line(f"{r.session.session_id}: {r.restored} message(s) back")
    return EXIT_OK


def cmd_import(client: Client, args: argparse.Namespace, out: Output) -> int:
    path = args.conversation if args.conversation.startswith("/") else ""
    r = client.import_session(
        agent_session_id="" if path else args.conversation,
        transcript_path=path,
        mode="power" if args.power else None,
        study_id=args.study or "",
        session_id=args.id or "",
    )
    if out.json:
        out.record(proto_dict(r))
    else:
        out.line(r.session.session_id)
        out.note(f"{r.imported_messages} message(s) imported")
    return EXIT_OK


def add_commands(add: Callable[[str, Any, str], argparse.ArgumentParser]) -> None:
    """The commands, added with build_parser's `add(name, fn, help)`."""
    p = add(
        "aside",
        cmd_aside,
        "ask a question aside: answered from the conversation, never added to it "
        "(also while a turn runs)",
    )
    p.add_argument("id")
    p.add_argument("text")
    p = add("rename", cmd_rename, "set a session's title")
    p.add_argument("id")
    p.add_argument("title")
    p = add(
        "mcp",
        cmd_mcp,
        "a session's MCP servers as its live agent has them; or reconnect, enable, disable one",
    )
    p.add_argument("id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reconnect", metavar="NAME", help="reconnect server NAME")
    g.add_argument("--enable", metavar="NAME", help="enable server NAME")
    g.add_argument(
        "--disable", metavar="NAME", help="disable server NAME (until the agent restarts)"
    )
    p = add(
        "rewind",
        cmd_rewind,
        "undo the agent's file changes since a user message (the #id `history` shows)",
    )
    p.add_argument("id")
    p.add_argument("message_id", type=int)
    p.add_argument("--dry-run", action="store_true", help="only list the files")
    p.add_argument("--force", action="store_true", help="also files changed by someone else since")
    p = add(
        "rollback",
        cmd_rollback,
        "go on from before a user message; later messages stay in history, rolled back",
    )
    p.add_argument("id")
    p.add_argument("message_id", type=int)
    p.add_argument("--files", action="store_true", help="also rewind the agent's file changes")
    p = add("undo-rollback", cmd_undo_rollback, "undo the last rollback (until a turn runs)")
    p.add_argument("id")
    p = add(
        "import",
        cmd_import,
        "make a conversation of the plain claude CLI a session (prints its id)",
    )
    p.add_argument("conversation", help="its id (the CLI's session id), or its transcript's path")
    p.add_argument("--id", metavar="ID", help="the session id (default: generated)")
    p.add_argument("--study", metavar="S", help="attach study S")
    p.add_argument("--power", action="store_true", help="power mode (if the daemon allows it)")
