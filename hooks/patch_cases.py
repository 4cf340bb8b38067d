"""What activation patching patches: the anchors (each "wait", and its random control) of every
trajectory, aligned on content tokens between source and target. What each metric reads is the
metric's own business (`hooks.patch_metrics`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from waitlens.hooks.alignment import Alignment, align_content, check_pair
from waitlens.traces.formats import Rendered
from waitlens.traces.lexicon import Lexicon
from waitlens.traces.positions import CONTROL_WORD, Positions, find_positions
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel

DEFAULT_WINDOW = (-2, 4)


@dataclass
class PatchRow:
    """One patched cell's value for one metric (a row of `PatchResult.table`)."""

    direction: str
    source: str
    target: str
    trajectory_id: str
    problem_id: str
    anchor: int  # the wait's group number within its trajectory
    control: str  # "none" (the wait) | "random"
    layer: int
    rel_pos: int
    position: int  # target token index patched
    metric: str
    clean: float
    patched: float
    effect: float  # patched - clean
    attribution: float = float("nan")


ROW_COLUMNS = [f.name for f in dataclasses.fields(PatchRow)]


@dataclass
class Anchor:
    """One patched centre: a discourse token ("none") or its random control ("random")."""

    group: int  # the wait this belongs to (a wait and its control share it)
    control: str  # "none" | "random"
    offset: int  # reasoning offset of the centre token
    wait_token: int  # target token index of the group's wait (a control is read where its wait is)
    wait_char: int  # character offset of the group's wait in the reasoning


@dataclass
class PatchCase:
    """One trajectory prepared for one (source -> target) direction."""

    trajectory: Trajectory
    source_ids: list[int]
    target_ids: list[int]
    align: Alignment
    answer_tokens: tuple[int, int]  # in the target rendering
    anchors: list[Anchor]
    target_rendered: Rendered | None = None  # rendered with the gold answer
    cache: dict = field(default_factory=dict, repr=False)  # per-case values metrics compute once


@dataclass
class PatchResult:
    """Per-(trajectory, anchor, layer, rel_pos, metric) rows (`ROW_COLUMNS`) and run facts."""

    table: pd.DataFrame
    info: dict = field(default_factory=dict)

    def concat(self, other: PatchResult) -> PatchResult:
        info = {**self.info, "directions": self.info.get("directions", []) + other.info.get("directions", [])}
        return PatchResult(pd.concat([self.table, other.table], ignore_index=True), info)


def parse_window(window) -> tuple[int, int]:
    """``"-2:4"`` or ``(-2, 4)`` -> (-2, 4), inclusive at both ends."""
    if isinstance(window, str):
        try:
            lo, hi = (int(x) for x in window.split(":"))
        except ValueError:
            raise ValueError(f"window must look like '-2:4', got {window!r}") from None
    else:
        lo, hi = (int(x) for x in window)
    if lo > hi:
        raise ValueError(f"window start {lo} is after its end {hi}")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# preparing cases
def gold_version(traj: Trajectory) -> Trajectory:
    return dataclasses.replace(traj, answer=traj.gold)


def word_index(text: str, char: int) -> int:
    return len(text[:char].split())


def prepare_cases(source: LoadedModel, target: LoadedModel, trajectories: Sequence[Trajectory], positions: Positions | None = None, *,
                  word: str = "wait", control: bool = True, seed: int = 0) -> tuple[list[PatchCase], dict]:
    """Check the pair, align every trajectory, find its waits (and random controls).

    Trajectories without a wait are skipped with one warning that counts them; none left is
    an error. A trajectory whose content tokens differ between the two models raises
    (PairError) — a pair that disagrees there cannot be patched position by position.
    """
    check_pair(source, target)
    lex = Lexicon([word])
    golds = [gold_version(t) for t in trajectories]
    if positions is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            positions = find_positions(target, golds, lex)
    table = positions.table[positions.table["word"] != CONTROL_WORD]
    by_tid = {tid: g for tid, g in table.groupby("trajectory_id", sort=False)}
    rng = np.random.default_rng(seed)
    cases, skipped = [], []
    for traj, gt in zip(trajectories, golds, strict=True):
        rows = by_tid.get(traj.id)
        if rows is None or rows.empty:
            skipped.append(traj.id)
            continue
        srd, trd = source.render(gt), target.render(gt)
        source.check_length(srd.n_tokens, traj.id)
        target.check_length(trd.n_tokens, traj.id)
        al = align_content(srd, trd, source_tok=source.tokenizer, target_tok=target.tokenizer,
                           what=f"trajectory {traj.id!r}")
        discourse = set()
        for s, e in zip(rows["span_start"], rows["span_end"], strict=True):
            discourse.update(range(int(s) - al.target_start, int(e) - al.target_start))
        anchors = []
        for g, (_, row) in enumerate(rows.iterrows()):
            wt = int(row["token_index"])
            off = wt - al.target_start
            wc = int(row["char_start"]) - trd.reasoning_chars[0]
            anchors.append(Anchor(g, "none", off, wt, wc))
            if control:
                free = [i for i in range(off) if i not in discourse]
                if free:
                    anchors.append(Anchor(g, "random", int(rng.choice(free)), wt, wc))
        cases.append(PatchCase(traj, srd.input_ids, trd.input_ids, al, trd.answer_tokens, anchors, trd))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(trajectories)} trajectories without a {word!r} "
                      f"(e.g. {skipped[:3]})", stacklevel=2)
    if not cases:
        raise ValueError(f"none of the {len(trajectories)} trajectories has a {word!r} in its reasoning; "
                         "nothing to patch")
    return cases, {"n_trajectories": len(trajectories), "n_skipped_no_wait": len(skipped),
                   "n_cases": len(cases), "n_anchors": sum(a.control == "none" for c in cases for a in c.anchors)}


@dataclass
class Reads:
    """The target positions whose next-token distributions some metric needs."""

    positions: list[int]
    index: dict[int, int]

    @classmethod
    def build(cls, positions):
        p = sorted(set(positions))
        return cls(p, {q: i for i, q in enumerate(p)})
