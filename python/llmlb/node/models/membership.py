"""What the router made of this node: its id in the fleet and the fleet's peer credential.

Written by the sync loop (registration and heartbeat answers), read by downloads (which
name the node when asking for peers) and by the peer route (which checks the credential).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Membership:
    """The node's standing in its fleet.

    Attributes:
        node_id: the id the node registered under.
        peer_token: the credential of ``/v0/peer/*`` the router handed out (``None`` until
            registered).
    """

    node_id: str
    peer_token: str | None = None

    def fleet(self) -> tuple[str, str | None]:
        """``(node_id, peer_token)``."""
        return self.node_id, self.peer_token

    def token(self) -> str | None:
        """The peer credential (``None`` until registered)."""
        return self.peer_token
