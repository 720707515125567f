"""Webhook notifications of session events (docs/clients.md, "Notifications").

`payload` (which events are told and the signed body), `http` (one POST, over TCP, TLS or a
Unix socket, bounded), `endpoint` (one endpoint's stored queue: order, retries, drops),
`notifier` (the session layer's `Notices`: events in, deliveries out). The daemon builds the
notifier and points the registry at it (daemon/server.py).
"""
