"""atomizerd: the local daemon that runs persistent Claude Code sessions for Atomizer."""

__version__ = "0.1.0"
