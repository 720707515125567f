"""atomizerctl: manage atomizerd sessions and talk to them from a terminal or a script.

This module is the command line (the parser, `main`); the commands live by job in
`ctl_sessions.py`, `ctl_chat.py` (a turn from the terminal: interrupts, approvals, `chat`),
`ctl_tasks.py` and `ctl_notify.py` (a signed sample webhook, no daemon needed); the output in
`ctl_output.py` and a turn's rendering in `ctl_render.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from atomizer_client import ctl_conversation, ctl_notify, ctl_tasks
from atomizer_client.client import DEFAULT_TIMEOUT, Client
from atomizer_client.ctl_chat import cmd_chat
from atomizer_client.ctl_output import EXIT_INTERRUPTED, EXIT_OK, Output, exit_code_for
from atomizer_client.ctl_sessions import (
    cmd_approve,
    cmd_archive,
    cmd_audit,
    cmd_daemon,
    cmd_deny,
    cmd_history,
    cmd_label,
    cmd_ls,
    cmd_mode,
    cmd_new,
    cmd_rm,
    cmd_search,
    cmd_send,
    cmd_show,
    cmd_status,
    cmd_study,
    cmd_unarchive,
    cmd_watch,
)
from atomizer_client.errors import AtomizerError

Command = Callable[[Client, argparse.Namespace, Output], int]

EPILOG = """\
socket: --socket, else $ATOMIZERD_SOCKET, else $XDG_RUNTIME_DIR/atomizerd/atomizerd.sock,
else /run/atomizerd/atomizerd.sock.

--json prints one JSON object per line (per record, or per event of a turn) for scripts.

tool approval: in user mode the agent asks before it uses a tool outside the allowlist. `send`
and `chat` print the request and ask "allow? [y/N/a(lways)]" on the terminal (a: allow, and
allow the same call for the rest of the session). With --json, or when stdin is not a
terminal, nothing is asked: answer from anywhere with `approve`/`deny` (`watch` shows the
requests too), else the daemon denies it when approvals.timeout runs out. --yes / --no answer
every request of the turn with allow / deny. `audit` lists every outcome.

exit codes:
  0    ok
  1    the turn failed, or the agent reported an error
  2    usage error
  3    session (or pending permission request) not found
  4    invalid argument, or not possible now (closed session, no running turn, a permission
       request already answered)
  5    daemon unavailable (not running, draining, or not answering in time)
  6    permission denied (e.g. power mode disabled by the daemon's policy)
  7    resource exhausted (session, queue or size limits, the session's spending cap)
  130  interrupted (Ctrl-C)
"""

STATES = ("idle", "starting", "ready", "busy", "closed")


# --- argument parsing ----------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Added to the top parser and to every subcommand, so they work before or after it.
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--socket", default=default, help="daemon socket path")
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="one JSON object per line (records, or events of a turn)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS if suppress else DEFAULT_TIMEOUT,
        help=f"deadline in seconds for each call (default {DEFAULT_TIMEOUT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atomizerctl",
        description="Manage atomizerd sessions and talk to them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = add("new", cmd_new, "create a session (or reopen --id) and print its id")
    p.add_argument("--power", action="store_true", help="power mode (if the daemon allows it)")
    p.add_argument("--study", metavar="S", help="attach study S")
    p.add_argument("--id", metavar="ID", help="the session id (default: generated)")
    p.add_argument(
        "--budget",
        type=_usd_arg,
        default=0.0,
        metavar="USD",
        help="spending cap of the session; at it, messages are refused (exit 7)",
    )
    p.add_argument(
        "--turn-budget",
        type=_usd_arg,
        default=0.0,
        metavar="USD",
        help="spending cap of each turn (both may only lower the daemon's own caps)",
    )

    p = add("ls", cmd_ls, "list sessions, newest first")
    p.add_argument("--study", metavar="S", help="only sessions attached to study S")
    p.add_argument("--state", choices=STATES, help="only sessions in this state")
    p.add_argument(
        "--host-id", metavar="H", help="only sessions of host H (daemons sharing one database)"
    )
    p.add_argument(
        "--label", action="append", metavar="K=V", help="only sessions labelled K=V (repeatable)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--archived", action="store_true", help="only archived sessions")
    g.add_argument("--all", action="store_true", help="archived sessions too")

    p = add("label", cmd_label, "set a session's labels (K= removes K)")
    p.add_argument("id")
    p.add_argument("labels", nargs="+", metavar="K=V")
    p.add_argument("--replace", action="store_true", help="the labels become exactly these")
    add("archive", cmd_archive, "archive a session (its agent stops)").add_argument("id")
    add("unarchive", cmd_unarchive, "take a session out of the archive").add_argument("id")
    p = add("search", cmd_search, "search stored messages, best match first")
    p.add_argument("query")
    p.add_argument("--session", metavar="ID", help="only this session's messages")
    p.add_argument(
        "--label", action="append", metavar="K=V", help="only sessions labelled K=V (repeatable)"
    )
    p.add_argument("--limit", type=int, default=20, help="at most this many matches (20)")

    add("show", cmd_show, "show one session, with its spend and caps").add_argument("id")
    add("history", cmd_history, "print a session's stored messages").add_argument("id")

    p = add("mode", cmd_mode, "switch a session's mode")
    p.add_argument("id")
    p.add_argument("mode", choices=("user", "power"))

    p = add("study", cmd_study, "attach a study to a session, or detach with --none")
    p.add_argument("id")
    p.add_argument("study", nargs="?")
    p.add_argument("--none", action="store_true", help="detach the study")

    p = add("rm", cmd_rm, "close a session (its history stays unless --purge)")
    p.add_argument("id")
    p.add_argument("--purge", action="store_true", help="also delete its history and files")

    add("status", cmd_status, "show the daemon's status")
    p = add(
        "daemon",
        cmd_daemon,
        "restart the daemon; running turns go on under the next one (docs/restart.md)",
    )
    p.add_argument("action", choices=("restart",))
    p.add_argument(
        "--wait", type=float, default=60.0, metavar="S", help="how long to wait for it to return"
    )

    p = add(
        "send",
        cmd_send,
        "send a message and stream the reply (Ctrl-C interrupts); asks before tools run",
    )
    p.add_argument("id")
    p.add_argument("text", help="the message; - reads it from stdin (then nothing is asked)")
    p.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="FILE",
        help="send FILE with the message (an image, a PDF, text, Markdown, CSV or JSON; "
        "the type from its extension); repeatable",
    )
    p.add_argument(
        "--steer",
        action="store_true",
        help="while a turn runs, put the text into it now (instead of a turn of its own)",
    )
    p.add_argument(
        "--schema",
        metavar="JSON|@FILE",
        help="answer in this JSON Schema: the answer is printed as one line of JSON",
    )
    _approval_options(p)

    p = add("watch", cmd_watch, "follow a session's events live (Ctrl-C stops)")
    p.add_argument("id")
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="replay after SEQ")

    p = add("chat", cmd_chat, "interactive chat with a session; asks before tools run")
    p.add_argument("id")
    _approval_options(p)

    p = add("approve", cmd_approve, "allow a pending tool use (a permission request)")
    p.add_argument("id")
    p.add_argument("request_id", help="the request_id of the permission request")
    p.add_argument(
        "--remember", action="store_true", help="allow the same call for the rest of the session"
    )

    p = add("deny", cmd_deny, "deny a pending tool use (a permission request)")
    p.add_argument("id")
    p.add_argument("request_id", help="the request_id of the permission request")
    p.add_argument("--message", metavar="M", help="why, shown to the model")
    p.add_argument(
        "--remember", action="store_true", help="deny the same call for the rest of the session"
    )

    add("audit", cmd_audit, "a session's audit trail: tool approvals, mode switches").add_argument(
        "id"
    )
    ctl_tasks.add_commands(add)
    ctl_notify.add_commands(add)
    ctl_conversation.add_commands(add)
    return parser


def _approval_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--yes", action="store_true", help="allow every tool use the agent asks for, unasked"
    )
    group.add_argument(
        "--no", action="store_true", help="deny every tool use the agent asks for, unasked"
    )


def _usd_arg(value: str) -> float:
    try:
        amount = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an amount in USD: {value!r}") from None
    if not amount >= 0 or amount == float("inf"):
        raise argparse.ArgumentTypeError(f"not an amount in USD: {value!r}")
    return amount


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "study" and (args.none == (args.study is not None)):
        parser.error("study: give either a STUDY or --none")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = Output(as_json=args.json)
    if getattr(args, "no_daemon", False):  # notify test: talks to a receiver, not the daemon
        code: int = args.func(None, args, out)
        return code
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            code = args.func(client, args, out)
            return code
    except AtomizerError as e:
        _report(out, e)
        return exit_code_for(e)
    except KeyboardInterrupt:
        out.end_line()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`atomizerctl ls | head`); nothing left to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _report(out: Output, e: AtomizerError) -> None:
    if out.json:
        err = {"error": {"code": e.code.name, "details": e.details}}
        out.err.write(json.dumps(err) + "\n")
    else:
        out.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
