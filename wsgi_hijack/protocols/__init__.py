"""Sans-IO protocols for held connections: given events, produce bytes."""

from .base import Protocol, ProtocolError, framed
from .chunked import ChunkedStream
from .longpoll import LongPoll
from .plain import PlainStream
from .sse import ServerSentEvents, encode_event

__all__ = ["ChunkedStream", "LongPoll", "PlainStream", "Protocol", "ProtocolError",
           "ServerSentEvents", "encode_event", "framed"]
