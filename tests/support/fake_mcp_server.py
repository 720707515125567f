#!/usr/bin/env python3
"""A minimal stdio MCP server standing in for Atomizer's own (standard library only).

One tool, `study_info`, answers with the ATOMIZER_* environment the daemon gave the server,
so a test can check what reached it through the per-session MCP config.

With `--die-on-call` it exits (status 1, no answer) when the tool is called: a server that
fails in the middle of a turn.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TOOL = {
    "name": "study_info",
    "description": "Tells which Atomizer study and mode this session runs with.",
    "inputSchema": {"type": "object", "properties": {}},
}


def reply(request_id: Any, result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}) + "\n")
    sys.stdout.flush()


def handle(message: dict[str, Any]) -> None:
    method = message.get("method")
    if "id" not in message:
        return  # a notification
    if method == "initialize":
        reply(
            message["id"],
            {
                "protocolVersion": message.get("params", {}).get("protocolVersion", "2024-11-05"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "atomizer-fake", "version": "0.0.0"},
            },
        )
    elif method == "tools/list":
        reply(message["id"], {"tools": [TOOL]})
    elif method == "tools/call":
        if "--die-on-call" in sys.argv[1:]:
            sys.exit(1)
        info = {k: v for k, v in os.environ.items() if k.startswith("ATOMIZER_")}
        reply(
            message["id"], {"content": [{"type": "text", "text": json.dumps(info, sort_keys=True)}]}
        )
    else:
        reply(message["id"], {})


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            handle(json.loads(line))


if __name__ == "__main__":
    main()
