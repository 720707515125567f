"""Webhook deliveries waiting to be made (atomizerd/notify/): this host's, per endpoint, in
the order their events happened."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from atomizerd.store.base import StoreBase
from atomizerd.store.models import NotifyDeliveryRow


@dataclass(frozen=True)
class PendingDelivery:
    delivery_id: int
    endpoint: str
    event: str
    session_id: str
    created_at: float
    body: str


class OutboxStore(StoreBase):
    def add_delivery(
        self, endpoint: str, event: str, session_id: str, created_at: float, body: str
    ) -> int:
        row = NotifyDeliveryRow.create(
            host_id=self.host_id or "",
            endpoint=endpoint,
            event=event,
            session_id=session_id,
            created_at=created_at,
            body=body,
        )
        return int(row.id)

    def pending_deliveries(self, endpoint: str, limit: int) -> list[PendingDelivery]:
        """The newest `limit` of the endpoint's deliveries, oldest first (older ones beyond
        the queue's bound are the ones a full queue would have dropped)."""
        q = (
            NotifyDeliveryRow.select()
            .where(
                (NotifyDeliveryRow.host_id == (self.host_id or ""))
                & (NotifyDeliveryRow.endpoint == endpoint)
            )
            .order_by(NotifyDeliveryRow.id.desc())
            .limit(limit)
        )
        rows = [
            PendingDelivery(r.id, r.endpoint, r.event, r.session_id, r.created_at, r.body)
            for r in q
        ]
        return rows[::-1]

    def forget_deliveries(self, ids: Collection[int]) -> None:
        if ids:
            NotifyDeliveryRow.delete().where(NotifyDeliveryRow.id.in_(list(ids))).execute()

    def forget_older_deliveries(self, endpoint: str, before_id: int) -> int:
        """Deletes the endpoint's deliveries older than `before_id` (beyond its queue)."""
        return int(
            NotifyDeliveryRow.delete()
            .where(
                (NotifyDeliveryRow.host_id == (self.host_id or ""))
                & (NotifyDeliveryRow.endpoint == endpoint)
                & (NotifyDeliveryRow.id < before_id)
            )
            .execute()
        )

    def forget_endpoints_except(self, keep: Collection[str]) -> int:
        """Deliveries of endpoints no longer configured are dropped; how many."""
        cond = NotifyDeliveryRow.host_id == (self.host_id or "")
        if keep:
            cond &= NotifyDeliveryRow.endpoint.not_in(list(keep))
        return int(NotifyDeliveryRow.delete().where(cond).execute())
