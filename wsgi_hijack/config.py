"""Settings read from the environment, checked once, with errors that say what to fix."""

from __future__ import annotations

import os

DEFAULT_HEARTBEAT = 10.0
DEFAULT_MAX_BUFFER = 64 * 1024


def _positive(name: str, default: float, kind: type = float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a positive {kind.__name__}") from None
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: expected a positive {kind.__name__}")
    return value


def heartbeat_interval() -> float:
    """Seconds between heartbeat rounds: ``WSGI_HIJACK_HEARTBEAT``, default 10."""
    return _positive("WSGI_HIJACK_HEARTBEAT", DEFAULT_HEARTBEAT)


def max_buffer() -> int:
    """Bytes a connection may have waiting to be sent before it is dropped as
    a client that stopped reading: ``WSGI_HIJACK_MAX_BUFFER``, default 64 KiB.
    This is on top of what the kernel's socket send buffer already holds."""
    return int(_positive("WSGI_HIJACK_MAX_BUFFER", DEFAULT_MAX_BUFFER, int))


def log_level() -> str:
    """Level of the ``wsgi_hijack`` loggers: ``WSGI_HIJACK_LOG_LEVEL``, default INFO
    (each heartbeat round is logged at INFO, as the seed printed it)."""
    level = os.environ.get("WSGI_HIJACK_LOG_LEVEL", "INFO").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"WSGI_HIJACK_LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING, "
                         "ERROR or CRITICAL")
    return level
