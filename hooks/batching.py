"""Padded batches of token sequences, for every stage that runs many forwards.

One forward over a padded batch costs about what one sequence costs on a small model, so
the stages group sequences by length (less padding) into batches capped both in members and
in padded tokens (``members × longest``), as capture does. Padding is ``"right"`` (real
tokens keep positions ``0..n-1`` and never see the pads) or ``"left"`` (the real tokens end
at the last column; explicit ``position_ids`` keep each sequence's rope positions ``0..n-1``).
Either gives the unbatched numbers within float tolerance (tests check 1e-5).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

# Sub-batches are capped in padded tokens, so long sequences run one at a time.
MAX_BATCH_TOKENS = 8192
PADDINGS = ("right", "left")


@dataclass
class PaddedBatch:
    """A padded batch: ids, attention mask and rope positions, and where each sequence sits."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None  # None when nothing is padded
    position_ids: Int[Tensor, "batch pos"]
    offsets: list[int]  # column of each sequence's first token (0 with right padding)
    lengths: list[int]

    def flat_index(self, b: int, token_indices) -> Tensor:
        """Row numbers in the flattened ``[batch * pos]`` view of sequence b's token indices."""
        T = self.input_ids.shape[1]
        return b * T + self.offsets[b] + torch.as_tensor(list(token_indices), dtype=torch.long)


def check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return padding


def pad_batch(seqs: Sequence[Sequence[int] | Tensor], padding: str = "right", pad_id: int = 0,
              device: torch.device | str = "cpu") -> PaddedBatch:
    """Stack 1-D id sequences into one padded batch on `device`."""
    check_padding(padding)
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) < 1:
        raise ValueError("pad_batch needs at least one non-empty sequence")
    T = max(lengths)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pos = torch.zeros((len(seqs), T), dtype=torch.long)
    offsets = []
    for b, s in enumerate(seqs):
        n = lengths[b]
        o = 0 if padding == "right" else T - n
        ids[b, o:o + n] = torch.as_tensor(s, dtype=torch.long)
        mask[b, o:o + n] = 1
        pos[b, o:o + n] = torch.arange(n)
        offsets.append(o)
    padded = any(n != T for n in lengths)
    return PaddedBatch(ids.to(device), mask.to(device) if padded else None, pos.to(device), offsets, lengths)


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = MAX_BATCH_TOKENS) -> Iterator[list[int]]:
    """Indices into `lengths`, shortest first, in groups of at most `batch_size` whose padded
    size (members × longest) stays within `max_tokens` (a longer sequence runs alone)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    group: list[int] = []
    for i in order:  # sorted by length: the newest member is the longest
        n = lengths[i]
        if group and (len(group) >= batch_size or (len(group) + 1) * n > max_tokens):
            yield group
            group = []
        group.append(i)
    if group:
        yield group
