"""The drop-in for the web backend's original SessionManager, driven as the backend drives it,
against a real daemon running the real CLI (offline, the fake Messages API)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from atomizer_client import compat
from atomizer_client.compat import SessionManager, get_session_manager

from tests.e2e.conftest import E2E

pytestmark = pytest.mark.e2e

T = TypeVar("T")
ORIGINAL_INFO_KEYS = {
    "session_id",
    "mode",
    "study_id",
    "is_alive",
    "created_at",
    "last_active",
    "message_count",
    "db_record",
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def chunks_of(manager: SessionManager, session_id: str, text: str) -> list[dict[str, Any]]:
    return [c async for c in manager.send_message(session_id, text)]


@pytest.fixture
def manager(e2e: E2E, monkeypatch: pytest.MonkeyPatch) -> SessionManager:
    """The backend's `get_session_manager()`, finding the daemon as deployed ($ATOMIZERD_SOCKET)."""
    e2e.start()
    assert e2e.daemon is not None
    monkeypatch.setenv("ATOMIZERD_SOCKET", str(e2e.daemon.socket))
    monkeypatch.setattr(compat, "_session_manager", None)
    return get_session_manager()


def test_a_turn_yields_the_originals_text_and_done_dicts(e2e: E2E, manager: SessionManager) -> None:
    async def scenario() -> tuple[Any, ...]:
        await manager.start()
        session = await manager.create_session(mode="user", study_id=None)
        chunks = await chunks_of(manager, session.session_id, "hello there [[chunks:4]]")
        info = manager.get_session_info(session.session_id)
        await manager.stop()
        return session, chunks, info

    session, chunks, info = run(scenario())
    assert get_session_manager() is manager
    assert session.mode == "user" and session.study_id is None and session.process is None
    assert all(c.keys() == {"type", "content"} and c["type"] == "text" for c in chunks[:-1])
    assert len(chunks) > 2  # streamed in pieces, not one blob at the end
    assert "".join(c["content"] for c in chunks[:-1]) == "echo: hello there"
    assert chunks[-1] == {"type": "done", "tool_calls": []}
    assert e2e.api.requests[-1].prompt_text == "hello there [[chunks:4]]"
    assert info is not None and info.keys() == ORIGINAL_INFO_KEYS
    assert info["session_id"] == session.session_id
    assert (info["mode"], info["study_id"], info["is_alive"]) == ("user", None, True)
    assert info["message_count"] == 2
    assert info["db_record"]["session_id"] == session.session_id
    assert info["last_active"] >= info["created_at"]


def test_tool_calls_are_listed_in_done_and_an_unasked_tool_is_denied(
    e2e: E2E, manager: SessionManager
) -> None:
    assert e2e.daemon is not None
    notes = e2e.daemon.root / "notes.txt"
    notes.write_text("beam length 3 m\n")
    refused = e2e.daemon.root / "refused.txt"
    read = f'[[tool:Read {{"file_path": "{notes}"}}]]'
    write = f'[[tool:Write {{"file_path": "{refused}", "content": "x"}}]]'

    async def scenario() -> list[dict[str, Any]]:
        session = await manager.create_session()
        return await chunks_of(manager, session.session_id, f"look {read} {write}")

    chunks = run(scenario())
    done = chunks[-1]
    assert done["type"] == "done" and done.keys() == {"type", "tool_calls"}
    read_call, write_call = done["tool_calls"]
    assert read_call["id"].startswith("toolu_fake_")
    assert (read_call["name"], read_call["input"], read_call["is_error"]) == (
        "Read",
        {"file_path": str(notes)},
        False,
    )
    assert "beam length 3 m" in read_call["result"]
    assert (write_call["name"], write_call["is_error"]) == ("Write", True)
    assert write_call["input"] == {"file_path": str(refused), "content": "x"}
    assert compat.DENIED_UNASKED in write_call["result"]
    assert not refused.exists()
    # What the model was given back: the file's text, then the refusal.
    results = e2e.api.requests[-1].tool_results
    assert "beam length 3 m" in str(results[0]["content"])
    assert results[1]["is_error"] and compat.DENIED_UNASKED in str(results[1]["content"])
    text = "".join(c["content"] for c in chunks if c["type"] == "text")
    assert "tool_result Read is_error=false" in text and "tool_result Write is_error=true" in text


def test_a_permission_handler_may_allow_the_tool(e2e: E2E, manager: SessionManager) -> None:
    assert e2e.daemon is not None
    target = e2e.daemon.root / "studies" / "allowed.txt"
    asked: list[str] = []

    async def approve(request: Any) -> bool:
        asked.append(request.tool_name)
        return True

    manager.permission_handler = approve

    async def scenario() -> list[dict[str, Any]]:
        session = await manager.create_session()
        prompt = f'[[tool:Write {{"file_path": "{target}", "content": "ok"}}]]'
        return await chunks_of(manager, session.session_id, prompt)

    chunks = run(scenario())
    assert asked == ["Write"] and target.read_text() == "ok"
    assert [c["is_error"] for c in chunks[-1]["tool_calls"]] == [False]


def test_an_agent_error_is_an_error_dict_before_done(e2e: E2E, manager: SessionManager) -> None:
    async def scenario() -> list[dict[str, Any]]:
        session = await manager.create_session()
        return await chunks_of(manager, session.session_id, "fail [[error:529]] [[no-retry]]")

    chunks = run(scenario())
    error, done = chunks[-2:]
    assert error.keys() == {"type", "message"} and error["type"] == "error"
    assert error["message"].startswith("API Error: 529")
    assert done == {"type": "done", "tool_calls": []}
    assert all(c["type"] == "text" for c in chunks[:-2])


def test_an_unknown_session_yields_only_the_originals_error(
    e2e: E2E, manager: SessionManager
) -> None:
    assert e2e.daemon is not None
    (e2e.daemon.root / "studies" / "beam").mkdir()

    async def scenario() -> tuple[Any, ...]:
        chunks = await chunks_of(manager, "no-such-session", "hello")
        bad_id = await chunks_of(manager, "../etc", "hello")
        try:
            await manager.switch_mode("no-such-session", "user")
        except ValueError as e:
            switched: str = str(e)
        await manager.set_study_context("no-such-session", "beam")  # ignored, as before
        session = await manager.create_session()
        with pytest.raises(ValueError, match="study 'nope' does not exist"):
            await manager.set_study_context(session.session_id, "nope")
        return chunks, bad_id, switched

    chunks, bad_id, switched = run(scenario())
    assert chunks == bad_id == [{"type": "error", "message": "Session not found"}]
    assert switched == "Session no-such-session not found"
    assert manager.get_session("no-such-session") is None
    assert manager.get_session_info("no-such-session") is None


def test_study_mode_and_resume_across_a_new_manager(e2e: E2E, manager: SessionManager) -> None:
    assert e2e.daemon is not None
    (e2e.daemon.root / "studies" / "beam").mkdir()

    async def first() -> str:
        session = await manager.create_session(mode="user", study_id=None)
        await chunks_of(manager, session.session_id, "remember the word banana")
        await manager.set_study_context(session.session_id, "beam")
        held = manager.get_session(session.session_id)
        assert held is session and session.study_id == "beam"
        await manager.stop()
        return session.session_id

    sid = run(first())
    assert manager.get_session(sid) is None  # stop() forgets; the daemon keeps the session

    async def later() -> tuple[Any, ...]:
        again = SessionManager()
        session = await again.create_session(mode="user", study_id="beam", resume_session_id=sid)
        chunks = await chunks_of(again, sid, "what was the word")
        info = again.get_session_info(sid)
        await again.stop()
        return session, chunks, info

    session, chunks, info = run(later())
    assert session.session_id == sid and session.study_id == "beam"
    assert chunks[-1] == {"type": "done", "tool_calls": []}
    last = e2e.api.requests[-1]
    users = " ".join(last.texts("user"))
    assert "remember the word banana" in users  # the same conversation, continued
    assert "beam" in users  # the study attached since then reached the model
    assert info is not None and info["message_count"] == 4 and info["study_id"] == "beam"


def test_a_question_handler_answers_the_agents_questions(e2e: E2E, manager: SessionManager) -> None:
    questions = {
        "questions": [
            {
                "question": "Which material?",
                "header": "Material",
                "options": [
                    {"label": "Steel", "description": ""},
                    {"label": "Oak", "description": ""},
                ],
                "multiSelect": False,
            }
        ]
    }
    asked: list[str] = []

    def pick(question: Any) -> dict[str, str]:
        asked.extend(q.question for q in question.questions)
        return {"Which material?": "Oak"}

    manager.question_handler = pick

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        session = await manager.create_session()
        prompt = f"[[tool:AskUserQuestion {json.dumps(questions)}]]"
        answered = await chunks_of(manager, session.session_id, prompt)
        manager.question_handler = None  # without one, questions are declined at once
        declined = await chunks_of(manager, session.session_id, "again " + prompt)
        return answered, declined

    answered, declined = run(scenario())
    assert asked == ["Which material?"]
    assert answered[-1]["tool_calls"][0]["name"] == "AskUserQuestion"
    assert not answered[-1]["tool_calls"][0]["is_error"]
    assert declined[-1]["tool_calls"][0]["is_error"]
    first, second = e2e.api.requests[-1].tool_results  # the conversation so far
    assert '"Which material?"="Oak"' in str(first["content"])
    assert "chose not to answer" in str(second["content"])
