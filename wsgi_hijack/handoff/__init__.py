"""Moving held connections to a successor worker: their fds and their state.

See ``docs/restarts.rst``. The parts, each in its module:

- :mod:`.codec`: what a held connection's state is, as bytes (sans-IO);
- :mod:`.transport`: a Unix socket between two processes of the same user,
  carrying a batch of fds (``SCM_RIGHTS``) and the encoded states;
- :mod:`.rendezvous`, :mod:`.successors`: where the processes of one
  deployment meet, and which workers succeed which;
- :mod:`.park`, :mod:`.master`: the master's park process, which keeps a
  departing worker's connections until a successor takes them;
- :mod:`.worker`: a worker's side, giving at exit and taking at start.
"""

from .codec import ConnectionState, HandoffError, decode_batch, encode_batch

__all__ = ["ConnectionState", "HandoffError", "decode_batch", "encode_batch"]
