"""The scheduler's slots (one llama.cpp sequence each) and which free one a new job takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Slot:
    """One sequence of the context and what its KV cells hold."""

    seq: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cells hold
    last_used: float = 0.0
    busy: bool = False


def fresh_slot(slots: Sequence[Slot], free: list[Slot], taken: Sequence[Slot]) -> Slot:
    """The free slot to overwrite: one next to the most sequences in use (``taken`` ones
    too), so that the running sequences' ids stay in few runs of consecutive ids, which
    llama.cpp computes in one pass each; then an empty one; then the least recently used
    one (its cells are the least likely to be asked for again).

    Args:
        slots: every slot of the context, indexed by sequence id.
        free: the candidates.
        taken: slots chosen for jobs starting in the same step.
    """

    def in_use(seq: int) -> bool:
        if not 0 <= seq < len(slots):
            return False
        neighbour = slots[seq]
        return neighbour.busy or neighbour in taken

    return min(
        free,
        key=lambda s: (
            -(in_use(s.seq - 1) + in_use(s.seq + 1)),
            len(s.tokens) > 0,
            s.last_used,
        ),
    )
