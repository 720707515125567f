"""The agent process layer: the `claude` CLI's stream-json protocol, its argv and environment,
and one live agent process (spawn, line-framed I/O, control requests, bounded stop).

No pool, no sessions, no gRPC here: those sit on top of `AgentProcess`.
"""
