"""The daemon process: its command line, start-up, main loop and shutdown."""

import sys

# structlog renders exceptions with `rich` when that happens to be installed (a development
# tool's dependency, not one of the daemon's): importing it is an eighth of the daemon's
# start-up. Imported here without it, structlog renders them as the installed daemon does;
# whoever imports `rich` itself later still gets it.
if "structlog" not in sys.modules and "rich" not in sys.modules:
    sys.modules["rich"] = None  # type: ignore[assignment]  # its import raises ImportError
    try:
        import structlog.dev  # noqa: F401
    finally:
        del sys.modules["rich"]
