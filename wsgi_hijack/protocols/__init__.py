"""Sans-IO protocols for held connections: given events, produce bytes."""

from .base import Protocol, ProtocolError
from .plain import PlainStream

__all__ = ["Protocol", "ProtocolError", "PlainStream"]
