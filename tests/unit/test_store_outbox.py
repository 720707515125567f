"""Stored webhook deliveries on both engines (an SQLite file, a real PostgreSQL server): per
host and endpoint, in order, bounded, forgotten."""

from __future__ import annotations

from atomizerd.store.db import Store


def test_deliveries_are_kept_per_host_and_endpoint_in_order(store_url: str) -> None:
    a, b = Store(store_url, host_id="host-a"), Store(store_url, host_id="host-b")
    try:
        ids = [
            a.add_delivery("e1", "turn_completed", "s1", float(n), f'{{"n":{n}}}') for n in range(5)
        ]
        a.add_delivery("e2", "question", "s1", 9.0, "{}")
        b.add_delivery("e1", "turn_failed", "s9", 1.0, "{}")
        assert [r.body for r in a.pending_deliveries("e1", 100)] == [
            f'{{"n":{n}}}' for n in range(5)
        ]
        newest = a.pending_deliveries("e1", 2)  # the newest two, oldest first
        assert [r.delivery_id for r in newest] == ids[3:]
        assert a.forget_older_deliveries("e1", newest[0].delivery_id) == 3
        a.forget_deliveries([ids[3]])
        assert [r.delivery_id for r in a.pending_deliveries("e1", 100)] == [ids[4]]
        assert a.forget_endpoints_except(["e1"]) == 1  # e2's row, of this host only
        assert [r.event for r in b.pending_deliveries("e1", 100)] == ["turn_failed"]
        assert a.forget_endpoints_except([]) == 1
        assert a.pending_deliveries("e1", 100) == [] and len(b.pending_deliveries("e1", 9)) == 1
    finally:
        a.close()
        b.close()
