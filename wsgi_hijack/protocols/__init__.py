"""Sans-IO protocols for held connections: given events, produce bytes."""

from .base import ConnectionDone, Protocol, ProtocolError, framed
from .chunked import ChunkedStream
from .longpoll import LongPoll
from .plain import PlainStream
from .sse import ServerSentEvents, encode_event

__all__ = ["ChunkedStream", "ConnectionDone", "LongPoll", "PlainStream", "Protocol",
           "ProtocolError", "ServerSentEvents", "encode_event", "framed"]
