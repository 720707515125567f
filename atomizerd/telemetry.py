"""What the daemon's parts report as it happens: the hooks the domain calls, below it.

The pool, the turn runner (and the approvals it builds) and the reaper each take a `Telemetry`
when built and call its hooks where something happens (a turn ends, an agent is evicted, a
permission is decided). The hooks here do nothing, so a part built without one (a test, a tool)
reports nowhere. The hooks take plain values, never the domain's own types: whoever counts them
(the Prometheus metrics in `daemon/metrics.py`) needs nothing of the domain.

The daemon wires one `Relay` into its parts at start-up and points it at its metrics once the
endpoint listens (`daemon/server.py`); each daemon has its own relay, so two daemons in one
process never mix their figures.
"""

from __future__ import annotations

# Why an agent's start failed (`Telemetry.spawn_failed`): it died during its start-up handshake,
# the conversation it was to resume is gone, its program could not be started, the daemon
# refused it (e.g. the sandbox cannot run), anything else.
SPAWN_REASONS = ("died_at_start", "resume_failed", "spawn_error", "refused", "error")
# Who decided a permission request (`Telemetry.permission_decided`).
DECIDERS = ("client", "rule", "timeout", "policy")
# How a webhook delivery ended (`Telemetry.notify_delivered`): received (a 2xx), rejected by
# the receiver (a 4xx or another status that is not retried), given up after
# notify.give_up_after of retries.
DELIVERY_OUTCOMES = ("delivered", "rejected", "given_up")


class Telemetry:
    """The hooks. These do nothing; an implementation counts what it wants of them."""

    def turn_running(self, key: object, started: float) -> None:
        """The turn `key` has its message with the agent (`started`: the loop's clock). `key`
        only identifies the turn (weakly referable, hashable): the same object comes back in
        `first_event` and `turn_ended`."""

    def first_event(self, key: object, now: float) -> None:
        """The agent's first output line of the turn arrived (`now`: the loop's clock)."""

    def turn_ended(self, key: object, outcome: str, code: str, cost_usd: float) -> None:
        """The turn is over (stored): `outcome` is completed, interrupted or failed, `code` the
        failure's code (empty unless failed), `cost_usd` what it cost (0 for a failed turn)."""

    def agent_evicted(self) -> None:
        """An idle agent is being stopped to free its slot for a waiting lease."""

    def spawn_failed(self, reason: str) -> None:
        """An agent's start failed, for `reason` (one of `SPAWN_REASONS`). A cancelled start
        (the daemon stopping) is not a failure and is not reported."""

    def permission_decided(self, decider: str, allow: bool) -> None:
        """A permission request was decided (`decider`: one of `DECIDERS`)."""

    def reaper_pass(self, stopped: int, purged: int, errors: int) -> None:
        """A reaper pass finished: agents stopped, sessions purged, failures to do either."""

    def notify_delivered(self, endpoint: str, outcome: str, latency: float) -> None:
        """A webhook delivery to `endpoint` (its name) ended with `outcome` (one of
        `DELIVERY_OUTCOMES`), `latency` seconds after its event."""

    def notify_attempt_failed(self, endpoint: str) -> None:
        """An attempt to deliver to `endpoint` failed and will be retried."""

    def notify_dropped(self, endpoint: str) -> None:
        """`endpoint`'s queue was full: its oldest waiting delivery was dropped."""

    def notify_state(self, endpoint: str, queued: int, failing: bool) -> None:
        """`endpoint` now has `queued` deliveries waiting and is (or is no longer) failing."""


NULL = Telemetry()


class Relay(Telemetry):
    """Forwards every hook to `target`, which can be set after the parts holding the relay were
    built (the null telemetry until then)."""

    def __init__(self, target: Telemetry = NULL) -> None:
        self.target = target

    def point_at(self, target: Telemetry | None) -> None:
        """Reports go to `target` from now on (None: nowhere)."""
        self.target = NULL if target is None else target

    def turn_running(self, key: object, started: float) -> None:
        self.target.turn_running(key, started)

    def first_event(self, key: object, now: float) -> None:
        self.target.first_event(key, now)

    def turn_ended(self, key: object, outcome: str, code: str, cost_usd: float) -> None:
        self.target.turn_ended(key, outcome, code, cost_usd)

    def agent_evicted(self) -> None:
        self.target.agent_evicted()

    def spawn_failed(self, reason: str) -> None:
        self.target.spawn_failed(reason)

    def permission_decided(self, decider: str, allow: bool) -> None:
        self.target.permission_decided(decider, allow)

    def reaper_pass(self, stopped: int, purged: int, errors: int) -> None:
        self.target.reaper_pass(stopped, purged, errors)

    def notify_delivered(self, endpoint: str, outcome: str, latency: float) -> None:
        self.target.notify_delivered(endpoint, outcome, latency)

    def notify_attempt_failed(self, endpoint: str) -> None:
        self.target.notify_attempt_failed(endpoint)

    def notify_dropped(self, endpoint: str) -> None:
        self.target.notify_dropped(endpoint)

    def notify_state(self, endpoint: str, queued: int, failing: bool) -> None:
        self.target.notify_state(endpoint, queued, failing)
