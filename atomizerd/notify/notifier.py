"""The webhooks as the session layer sees them (`Notices`): every emitted event is classified,
and each one worth telling is stored and queued for the endpoints that want it.

Nothing here waits on a receiver inside an event's emit: queuing is a row insert and an append;
each endpoint's worker delivers in the background (notify/endpoint.py). A permission request
with nobody attached waits for its notification's delivery (`delivered`), so its
`approvals.timeout` counts from when someone was told.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable

import structlog

from atomizerd.config import Config
from atomizerd.config.notify import Webhook, parse_webhooks
from atomizerd.errors import StoreDown
from atomizerd.model import SessionRecord, WebhookStatus
from atomizerd.notify import payload
from atomizerd.notify.endpoint import Delivery, Endpoint, Post
from atomizerd.notify.http import post
from atomizerd.sessions import events as ev
from atomizerd.sessions.notices import Notices
from atomizerd.store.db import Store
from atomizerd.telemetry import NULL, Telemetry

log = structlog.get_logger("atomizerd.notify")

# Permission requests whose delivery someone may be waiting for: decided ones are forgotten
# at their `permission_decided`; this bounds what a bug or an odd agent could leave behind.
MAX_AWAITED = 10_000


class Webhooks(Notices):
    def __init__(
        self,
        config: Config,
        store: Store,
        telemetry: Telemetry = NULL,
        *,
        send: Post = post,
        rand: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.endpoints = [
            Endpoint(
                hook,
                config.notify,
                store,
                telemetry,
                send=send,
                on_delivered=self._delivered,
                **({"rand": rand} if rand is not None else {}),
            )
            for hook in parse_webhooks(config.notify.webhooks)
        ]
        self._awaited: OrderedDict[str, asyncio.Event] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Loads what a previous daemon left to deliver, then starts each endpoint's worker."""
        self._load()
        for e in self.endpoints:
            self._tasks.append(asyncio.create_task(e.run(), name=f"webhook {e.hook.name}"))

    async def close(self) -> None:
        """Stops delivering; what is pending stays stored for the next daemon."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def _load(self) -> None:
        try:
            gone = self.store.forget_endpoints_except([e.hook.key for e in self.endpoints])
            if gone:
                log.info("deliveries of endpoints no longer configured dropped", count=gone)
            for e in self.endpoints:
                self._load_endpoint(e)
        except StoreDown as err:
            log.error("pending webhook deliveries not read", error=str(err))

    def _load_endpoint(self, e: Endpoint) -> None:
        """The endpoint's stored deliveries, in order; beyond its queue's bound the oldest
        are dropped, as a full queue would have."""
        rows = self.store.pending_deliveries(e.hook.key, self.config.notify.queue_size)
        if not rows:
            return
        self.store.forget_older_deliveries(e.hook.key, rows[0].delivery_id)
        for r in rows:
            at = e.give_up_at(r.created_at)
            e.put(Delivery(r.body.encode(), r.event, r.created_at, at, row_id=r.delivery_id))
        log.info("pending webhook deliveries taken up", endpoint=e.hook.name, count=len(rows))

    def status(self) -> list[WebhookStatus]:
        return [e.status() for e in self.endpoints]

    # --- Notices ---------------------------------------------------------------------------

    def session_event(self, record: SessionRecord, event: ev.SessionEvent) -> None:
        if isinstance(event.kind, ev.PermissionDecided | ev.QuestionAnswered):
            self._awaited.pop(event.kind.request_id, None)
            return
        if not self.endpoints:
            return
        note = payload.classify(event)
        if note is None:
            return
        labels = record.label_map()
        for e in self.endpoints:
            if note.event in e.hook.events and e.hook.matches(labels):
                self._queue(e, note, event, record)

    def notifies(self, record: SessionRecord, event: str) -> bool:
        labels = record.label_map()
        return any(event in e.hook.events and e.hook.matches(labels) for e in self.endpoints)

    async def delivered(self, request_id: str, bound: float) -> bool:
        told = self._awaited.get(request_id)
        if told is None:
            return False
        try:
            async with asyncio.timeout(bound):
                await told.wait()
        except TimeoutError:
            return False
        return True

    # --- inside -------------------------------------------------------------------------------

    def _queue(
        self, e: Endpoint, note: payload.Notification, event: ev.SessionEvent, rec: SessionRecord
    ) -> None:
        hook: Webhook = e.hook
        body = payload.body(
            note,
            event,
            rec,
            include_text=hook.include_text,
            max_bytes=self.config.notify.max_body_bytes,
        )
        row_id: int | None = None
        try:
            row_id = self.store.add_delivery(
                hook.key, note.event, rec.session_id, event.time, body.decode()
            )
        except StoreDown as err:  # delivered all the same, but lost if the daemon stops first
            log.error("webhook delivery not stored", endpoint=hook.name, error=str(err))
        if note.ref:
            self._awaited.setdefault(note.ref, asyncio.Event())
            while len(self._awaited) > MAX_AWAITED:
                self._awaited.popitem(last=False)
        e.put(Delivery(body, note.event, event.time, e.give_up_at(event.time), row_id, note.ref))

    def _delivered(self, d: Delivery) -> None:
        if d.ref and (told := self._awaited.get(d.ref)) is not None:
            told.set()
