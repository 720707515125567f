"""The store migrates a version-1 database forward without losing anything."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from atomizerd.store.db import SCHEMA_VERSION, Store

V1_SCHEMA = """
CREATE TABLE schema_version (id INTEGER NOT NULL PRIMARY KEY, version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
CREATE TABLE sessions (session_id VARCHAR(64) NOT NULL PRIMARY KEY, mode VARCHAR(16) NOT NULL,
  study_id VARCHAR(64), agent_session_id VARCHAR(64) NOT NULL, agent_started INTEGER NOT NULL,
  closed INTEGER NOT NULL, created_at REAL NOT NULL, last_active_at REAL NOT NULL,
  message_count INTEGER NOT NULL, total_cost_usd REAL NOT NULL, agent_cost_usd REAL NOT NULL,
  seq_reserved INTEGER NOT NULL);
CREATE TABLE messages (id INTEGER NOT NULL PRIMARY KEY, session_id VARCHAR(64) NOT NULL
  REFERENCES sessions (session_id) ON DELETE CASCADE, turn_id VARCHAR(64) NOT NULL,
  role VARCHAR(16) NOT NULL, content TEXT NOT NULL, status VARCHAR(16) NOT NULL,
  request_id VARCHAR(128), tool_calls TEXT NOT NULL, cost_usd REAL NOT NULL, usage TEXT NOT NULL,
  detail TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE agent_processes (pgid INTEGER NOT NULL PRIMARY KEY, session_id VARCHAR(64) NOT NULL,
  start_time INTEGER NOT NULL, started_at REAL NOT NULL);
INSERT INTO sessions VALUES ('old', 'user', NULL, '0b8f1c9e-7d5e-4b8a-9a53-1f0c7f6c2d11', 1, 0,
  1.0, 2.0, 2, 0.5, 0.5, 1024);
INSERT INTO messages VALUES (1, 'old', 't1', 'user', 'hello', 'complete', NULL, '[]', 0, '{}',
  '', 1.0);
"""


def test_a_version_1_database_is_migrated_forward(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
    store = Store(f"sqlite:///{path}")
    try:
        assert store.schema_version() == SCHEMA_VERSION
        old = store.get_session("old")
        assert old is not None and old.message_count == 2 and old.budget_usd == 0.0
        assert [m.content for m in store.history("old", after_id=0, limit=10)] == ["hello"]
        store.remember_rule("old", "Bash", "d" * 64, True)
        assert store.find_rule("old", "Bash", "d" * 64) is True
    finally:
        store.close()


def test_a_database_from_a_newer_daemon_is_refused(tmp_path: Path) -> None:
    import pytest

    path = tmp_path / "future.db"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="newer than this atomizerd"):
        Store(f"sqlite:///{path}")
