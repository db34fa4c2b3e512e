"""The unit of a step the runners execute: the tokens of one sequence and where its KV lives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeqChunk:
    """Tokens of one sequence to feed in one step.

    ``start_pos`` tokens of the sequence are already in the KV cache; ``token_ids`` take positions
    ``[start_pos, start_pos + len(token_ids))``. ``block_table`` lists the sequence's blocks in
    order and covers at least ``start_pos + len(token_ids)`` positions.
    """

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    #: False for a chunk that does not reach the end of its sequence's known tokens (a prompt
    #: fed in pieces): its logits are not computed, and ``execute`` returns no row for it.
    needs_logits: bool = True
