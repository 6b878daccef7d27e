"""How an exchange with a node fails (:mod:`.upstream`): each error says whether the request
reached the node (:attr:`UpstreamError.sent`): a request that never left the router may go
to another node freely, one that a node held when it failed may not."""

from __future__ import annotations

import errno

# Connect failures caused by the router's own limits (file descriptors, buffers, ports): not a
# sign that the node is gone, so they must not take it offline.
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)


class UpstreamError(Exception):
    """An exchange with a node failed.

    Attributes:
        sent: the request was written to a connection to the node (``False`` when no
            connection could be opened: the node never saw it).
    """

    sent: bool = True


def unsent(exc: UpstreamError) -> UpstreamError:
    """``exc``, marked as raised before the request left the router."""
    exc.sent = False
    return exc


class ConnectError(UpstreamError):
    """No connection to the node (refused, unreachable, unresolvable, TLS failure)."""

    sent = False


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The node did not connect, answer or send more in time."""


class Disconnected(UpstreamError):
    """The node closed the connection early or sent something that is not HTTP/1.1."""
