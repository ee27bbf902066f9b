"""Moving held connections to a successor process: their fds and their state.

- :mod:`.codec`: what a held connection's state is, as bytes (sans-IO);
- :mod:`.transport`: a Unix socket between two processes of the same user,
  carrying a batch of fds (``SCM_RIGHTS``) and the encoded states.
"""

from .codec import ConnectionState, HandoffError, decode_batch, encode_batch

__all__ = ["ConnectionState", "HandoffError", "decode_batch", "encode_batch"]
