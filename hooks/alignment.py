"""Cross-model alignment on a trajectory's content tokens.

Two models (e.g. an SFT model and a post-trained model of the same base) render the same
trajectory with their own prompt formats, so their chat-template and special tokens may
differ. Patching between them pairs positions on the *reasoning* tokens only: the reasoning
token ids must be the same sequence in both renderings, and a reasoning position is
identified by its offset from the reasoning start. Anything else is refused with a message
that says where the two tokenizations part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from waitlens.traces.formats import Rendered

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel


class PairError(ValueError):
    """Two models (or a trajectory) that cannot be patched into each other."""


def check_pair(source: LoadedModel, target: LoadedModel) -> None:
    """Same layer count and residual width, else PairError naming both."""
    if source.n_layers != target.n_layers or source.d_model != target.d_model:
        raise PairError(
            f"cannot patch {source.spec} into {target.spec}: {source.spec} has {source.n_layers} layers "
            f"and d_model {source.d_model}, {target.spec} has {target.n_layers} layers and d_model "
            f"{target.d_model}; cross-model patching needs the same architecture"
        )


@dataclass
class Alignment:
    """Reasoning-start token index in each rendering and the shared reasoning length."""

    source_start: int
    target_start: int
    n_reasoning: int

    def to_source(self, target_index: int) -> int:
        return target_index - self.target_start + self.source_start

    def to_target(self, source_index: int) -> int:
        return source_index - self.source_start + self.target_start


def align_content(source_rd: Rendered, target_rd: Rendered, *, source_tok=None, target_tok=None,
                  what: str = "trajectory") -> Alignment:
    """Align two renderings on their reasoning tokens; PairError where the token ids differ."""
    s0, s1 = source_rd.reasoning_tokens
    t0, t1 = target_rd.reasoning_tokens
    a = source_rd.input_ids[s0:s1]
    b = target_rd.input_ids[t0:t1]
    if a != b:
        i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

        def show(tok, ids, k):
            if k >= len(ids):
                return "<end of reasoning>"
            return repr(tok.convert_ids_to_tokens(ids[k])) if tok is not None else str(ids[k])

        raise PairError(
            f"{what}: the two models tokenize the reasoning differently — first difference at reasoning "
            f"token {i}: source {show(source_tok, a, i)} (id {a[i] if i < len(a) else '-'}) vs target "
            f"{show(target_tok, b, i)} (id {b[i] if i < len(b) else '-'}); reasoning lengths {len(a)} and "
            f"{len(b)}. Cross-model patching needs identical content tokens"
        )
    return Alignment(s0, t0, s1 - s0)
