"""Webhook deliveries on a virtual clock: the queue, the retries and their backoff, drops,
signatures and the stored rows (a real SQLite store), with a recording stand-in for the POST."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import atomizerd.config as config_mod
from atomizerd.config.notify import parse_webhooks
from atomizerd.notify import payload
from atomizerd.notify.endpoint import Delivery, Endpoint, backoff
from atomizerd.notify.http import DeliveryError
from atomizerd.notify.notifier import Webhooks
from atomizerd.sessions import events as ev
from atomizerd.store.db import Store
from tests.support import virtual_time

SECRET = "s3cret"


def make_config(tmp: Path, **notify: Any) -> config_mod.Config:
    hooks = notify.pop(
        "webhooks", [{"url": "http://127.0.0.1:9/hook", "secret": SECRET, "name": "ops"}]
    )
    overrides = {f"notify.{k}": str(v) for k, v in notify.items()}
    overrides["notify.webhooks"] = json.dumps(hooks)
    overrides["daemon.state_dir"] = str(tmp / "state")
    overrides["daemon.runtime_dir"] = str(tmp / "run")
    overrides["atomizer.root"] = str(tmp)
    return config_mod.load(None, environ={}, overrides=overrides)


class Receiver:
    """Stands in for the POST: answers from `codes` (an int, or an exception to raise), and
    records what it got and when (the loop's virtual clock)."""

    def __init__(self, codes: list[int | Exception], then: int = 200) -> None:
        self.codes = codes
        self.then = then
        self.calls: list[tuple[float, bytes, dict[str, str]]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, hook: Any, body: bytes, headers: dict[str, str], t: float) -> int:
        if self.gate is not None:
            await self.gate.wait()
        self.calls.append((asyncio.get_running_loop().time(), body, dict(headers)))
        code = self.codes.pop(0) if self.codes else self.then
        if isinstance(code, Exception):
            raise code
        return code


def endpoint(tmp: Path, receiver: Receiver, rand: Callable[[], float] = lambda: 0.5, **kw: Any):
    cfg = make_config(tmp, **kw)
    store = Store(cfg.daemon.database)
    hook = parse_webhooks(cfg.notify.webhooks)[0]
    return Endpoint(hook, cfg.notify, store, send=receiver, rand=rand), store


def delivery(e: Endpoint, store: Store, n: int) -> Delivery:
    body = json.dumps({"n": n}).encode()
    row = store.add_delivery(e.hook.key, "turn_completed", "s1", 1.0, body.decode())
    return Delivery(body, "turn_completed", 1.0, e.give_up_at(1e18), row_id=row)


def stored(store: Store, e: Endpoint) -> list[int]:
    return [json.loads(r.body)["n"] for r in store.pending_deliveries(e.hook.key, 100)]


async def until(predicate: Callable[[], bool], seconds: float = 10_000) -> None:
    """Polls on the virtual clock (jumps when everything waits): never a wall-clock wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def test_backoff_doubles_up_to_its_ceiling_with_jitter_in_the_upper_half() -> None:
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0), (500, 60.0)]:
        assert backoff(attempt, 1.0, 60.0, lambda: 0.0) == ceiling / 2
        assert backoff(attempt, 1.0, 60.0, lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)
        assert ceiling / 2 <= backoff(attempt, 1.0, 60.0, lambda: 0.3) <= ceiling


def test_5xx_and_errors_are_retried_with_backoff_then_delivered_once(tmp_path: Path) -> None:
    receiver = Receiver([503, DeliveryError("refused"), 500])

    async def test() -> None:
        e, store = endpoint(tmp_path, receiver, retry_initial=2, retry_max=5)
        worker = asyncio.create_task(e.run())
        e.put(delivery(e, store, 1))
        await until(lambda: e.delivered == 1)
        worker.cancel()
        times = [t for t, _, _ in receiver.calls]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # rand = 0.5: three quarters of 2, 4, then 5 (the ceiling) seconds.
        assert gaps == pytest.approx([1.5, 3.0, 3.75])
        assert e.failed == 0 and e.last_error == "HTTP 500"
        assert stored(store, e) == []  # done with: its row is gone

    virtual_time.run(test())
    assert len(receiver.calls) == 4


def test_a_4xx_is_not_retried_and_the_endpoint_is_not_failing(tmp_path: Path) -> None:
    receiver = Receiver([400])

    async def test() -> None:
        e, store = endpoint(tmp_path, receiver, failing_after=1)
        worker = asyncio.create_task(e.run())
        e.put(delivery(e, store, 1))
        e.put(delivery(e, store, 2))
        await until(lambda: e.delivered == 1)
        worker.cancel()
        assert (e.failed, e.failing) == (1, False)
        assert stored(store, e) == []

    virtual_time.run(test())
    assert [json.loads(b)["n"] for _, b, _ in receiver.calls] == [1, 2]


def test_a_full_queue_drops_its_oldest_waiting_delivery_and_its_row(tmp_path: Path) -> None:
    async def test() -> None:
        e, store = endpoint(tmp_path, Receiver([]), queue_size=3)
        for n in range(5):
            e.put(delivery(e, store, n))
        assert e.dropped == 2
        assert [json.loads(d.body)["n"] for d in e.waiting] == [2, 3, 4]
        assert stored(store, e) == [2, 3, 4]

    virtual_time.run(test())


def test_order_holds_while_the_head_is_retried_and_a_failing_endpoint_is_reported(
    tmp_path: Path,
) -> None:
    receiver = Receiver([503] * 5)

    async def test() -> None:
        e, store = endpoint(tmp_path, receiver, failing_after=3, retry_initial=1, retry_max=4)
        worker = asyncio.create_task(e.run())
        e.put(delivery(e, store, 1))
        await until(lambda: e.failures_in_row >= 3)
        assert e.status().failing and e.status().last_error == "HTTP 503"
        e.put(delivery(e, store, 2))
        await until(lambda: e.delivered == 2)
        worker.cancel()
        assert not e.status().failing and e.status().failing_since == 0

    virtual_time.run(test())
    assert [json.loads(b)["n"] for _, b, _ in receiver.calls] == [1] * 6 + [2]


def test_a_delivery_is_given_up_after_give_up_after(tmp_path: Path) -> None:
    receiver = Receiver([], then=502)

    async def test() -> None:
        e, store = endpoint(tmp_path, receiver, give_up_after=100, retry_max=10)
        worker = asyncio.create_task(e.run())
        body = b"{}"
        row = store.add_delivery(e.hook.key, "question", "s", 0.0, "{}")
        import time

        e.put(Delivery(body, "question", time.time(), e.give_up_at(time.time()), row))
        await until(lambda: e.failed == 1)
        worker.cancel()
        assert stored(store, e) == []
        last = receiver.calls[-1][0] - receiver.calls[0][0]
        assert 90 <= last <= 100  # no attempt after its time was up

    virtual_time.run(test())


def test_every_attempt_is_signed_over_its_timestamp_and_the_body(tmp_path: Path) -> None:
    receiver = Receiver([503])

    async def test() -> None:
        e, store = endpoint(tmp_path, receiver)
        worker = asyncio.create_task(e.run())
        e.put(delivery(e, store, 7))
        await until(lambda: e.delivered == 1)
        worker.cancel()

    virtual_time.run(test())
    for _, body, headers in receiver.calls:
        stamp = headers["X-Atomizer-Timestamp"]
        want = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        assert headers["X-Atomizer-Signature"] == "v1=" + want.hexdigest()
        forged = hmac.new(b"other", f"{stamp}.".encode() + body, hashlib.sha256)
        assert headers["X-Atomizer-Signature"] != "v1=" + forged.hexdigest()
        assert headers["X-Atomizer-Event"] == "turn_completed"


def _session(store: Store, labels: dict[str, str] | None = None):
    return store.create_session("s1", "user", "beam", "conv-1", labels=labels or {})


def test_events_become_stored_deliveries_for_the_endpoints_that_want_them(tmp_path: Path) -> None:
    hooks = [
        {"url": "http://127.0.0.1:9/a", "secret": "a", "name": "all"},
        {
            "url": "http://127.0.0.1:9/b",
            "secret": "b",
            "name": "cfd",
            "labels": {"team": "cfd"},
            "events": ["turn_failed"],
            "include_text": True,
        },
    ]

    async def test() -> None:
        cfg = make_config(tmp_path, webhooks=hooks)
        store = Store(cfg.daemon.database)
        rec = _session(store, {"team": "cfd", "title": "Beam study"})
        w = Webhooks(cfg, store, send=Receiver([]))
        completed = ev.TurnCompleted(text="the secret reply", cost_usd=0.5)
        w.session_event(rec, ev.SessionEvent(3, "s1", "t1", 10.0, completed))
        w.session_event(rec, ev.SessionEvent(4, "s1", "t1", 11.0, ev.TextDelta("x")))
        failed = ev.TurnFailed(ev.TURN_TIMEOUT, "too long")
        w.session_event(rec, ev.SessionEvent(5, "s1", "t2", 12.0, failed))
        spawn = ev.TurnFailed(ev.SPAWN_FAILED, "no agent")
        w.session_event(rec, ev.SessionEvent(6, "s1", "t3", 13.0, spawn))
        a, b = w.endpoints
        assert [d.event for d in a.waiting] == ["turn_completed", "turn_failed", "session_failed"]
        assert [d.event for d in b.waiting] == ["turn_failed"]
        doc = json.loads(a.waiting[0].body)
        assert doc["session"] == {
            "id": "s1",
            "title": "Beam study",
            "labels": {"team": "cfd", "title": "Beam study"},
            "study": "beam",
            "mode": "user",
        }
        assert doc["data"]["cost_usd"] == 0.5 and "text" not in doc  # no bodies by default
        assert b"secret reply" not in a.waiting[0].body
        assert len(store.pending_deliveries(a.hook.key, 10)) == 3
        other = store.create_session("s2", "user", None, "conv-2", labels={"team": "x"})
        only_cfd = Webhooks(make_config(tmp_path, webhooks=hooks[1:]), store)
        assert only_cfd.notifies(rec, "turn_failed")
        assert not only_cfd.notifies(rec, "permission_request")  # not among its events
        assert not only_cfd.notifies(other, "turn_failed")  # not its labels

    virtual_time.run(test())


def test_include_text_is_cut_to_the_body_bound() -> None:
    rec_labels: dict[str, str] = {}
    note = payload.Notification("turn_completed", "done", {}, "é" * 100_000)

    class Rec:
        session_id, study_id, mode = "s", None, "user"

        def label_map(self) -> dict[str, str]:
            return rec_labels

    event = ev.SessionEvent(1, "s", "t", 0.0, ev.TurnCompleted(text=""))
    out = payload.body(note, event, Rec(), include_text=True, max_bytes=4096)  # type: ignore[arg-type]
    assert 3000 < len(out) <= 4096
    assert json.loads(out)["text"].endswith("…")


def test_pending_deliveries_are_taken_up_by_the_next_notifier_in_order(tmp_path: Path) -> None:
    receiver = Receiver([])

    async def test() -> None:
        cfg = make_config(tmp_path, queue_size=2)
        store = Store(cfg.daemon.database)
        rec = _session(store)
        first = Webhooks(cfg, store, send=receiver)  # never started: nothing is delivered
        for n in range(3):
            done = ev.TurnCompleted(text="", cost_usd=float(n))
            first.session_event(rec, ev.SessionEvent(n, "s1", f"t{n}", 1.0, done))
        second = Webhooks(cfg, store, send=receiver)
        second.start()
        await until(lambda: second.endpoints[0].delivered == 2)
        await second.close()
        assert store.pending_deliveries(second.endpoints[0].hook.key, 10) == []

    virtual_time.run(test())
    assert [json.loads(b)["data"]["cost_usd"] for _, b, _ in receiver.calls] == [1.0, 2.0]


def test_a_permission_request_is_delivered_before_its_waiter_is_told(tmp_path: Path) -> None:
    receiver = Receiver([])

    async def test() -> None:
        cfg = make_config(tmp_path)
        store = Store(cfg.daemon.database)
        rec = _session(store)
        w = Webhooks(cfg, store, send=receiver)
        receiver.gate = asyncio.Event()
        w.start()
        assert w.notifies(rec, "permission_request")
        asked = ev.PermissionRequest("r1", "Bash", "{}", "run ls", "tu1", 0.0)
        w.session_event(rec, ev.SessionEvent(1, "s1", "t", 1.0, asked))
        assert not await w.delivered("r1", 30)  # the receiver has not answered yet
        assert not await w.delivered("unknown", 30)
        receiver.gate.set()
        assert await w.delivered("r1", 30)
        await w.close()

    virtual_time.run(test())


def test_a_receiver_down_for_a_minute_gets_every_notification_afterwards_in_order_once(
    tmp_path: Path,
) -> None:
    """Connection refused for a whole (virtual) minute while events keep coming: once it is up,
    each is delivered exactly once and in the order the events happened."""
    down = DeliveryError("connection refused")
    receiver = Receiver([])
    up_at: list[float] = []

    async def send(hook: Any, body: bytes, headers: dict[str, str], t: float) -> int:
        loop = asyncio.get_running_loop()
        if not up_at or loop.time() < up_at[0]:
            receiver.calls.append((loop.time(), b"refused", {}))
            raise down
        return await receiver(hook, body, headers, t)

    async def test() -> None:
        e, store = endpoint(tmp_path, Receiver([]), retry_initial=1, retry_max=10)
        e.send = send  # the endpoint's POST: refused until up_at
        worker = asyncio.create_task(e.run())
        start = asyncio.get_running_loop().time()
        up_at.append(start + 60.0)
        for n in range(1, 6):
            e.put(delivery(e, store, n))
            await asyncio.sleep(10.0)  # virtual: events through the outage
        await until(lambda: e.delivered == 5)
        worker.cancel()
        assert stored(store, e) == []  # none left waiting

    virtual_time.run(test())
    got = [json.loads(b)["n"] for _, b, _ in receiver.calls if b != b"refused"]
    assert got == [1, 2, 3, 4, 5]
    assert any(b == b"refused" for _, b, _ in receiver.calls)
