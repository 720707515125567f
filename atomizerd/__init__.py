"""atomizerd: the local daemon that runs persistent Claude Code sessions for Atomizer."""

import os

# Process-wide settings, here because every entry point imports this package first (the
# `atomizerd` console script systemd runs, `python -m atomizerd`, tests) and they must be set
# before grpc is imported. Agents are started with fork+exec and never a forked Python, so
# gRPC's fork handlers have nothing to protect and only add work (and risk) to every spawn.
# setdefault: an explicit setting in the environment wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.1.0"
