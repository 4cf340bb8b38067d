"""What activation patching patches: the anchors (each "wait", and its random control) of every
trajectory, aligned on content tokens between source and target, with the positions each
metric reads (the correction read-out needs the ground truth of the organism)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from waitlens.hooks.alignment import Alignment, align_content, check_pair
from waitlens.traces.formats import Rendered
from waitlens.traces.lexicon import Lexicon
from waitlens.traces.positions import Positions, find_positions
from waitlens.traces.trajectory import Trajectory

METRICS = ("kl", "correction", "gold_prob")
DIFFERENTIABLE = ("correction", "gold_prob")
DEFAULT_WINDOW = (-2, 4)
ROW_COLUMNS = ["direction", "source", "target", "trajectory_id", "problem_id", "anchor", "control", "layer",
               "rel_pos", "position", "metric", "clean", "patched", "effect", "attribution"]


@dataclass
class Anchor:
    """One patched centre: a discourse token ("none") or its random control ("random")."""

    group: int  # the wait this belongs to (a wait and its control share it)
    control: str  # "none" | "random"
    offset: int  # reasoning offset of the centre token
    # correction read-out: (target index whose output is read, token id it should predict)
    reads: list[tuple[int, int]] | None = None


@dataclass
class PatchCase:
    """One trajectory prepared for one (source -> target) direction."""

    trajectory: Trajectory
    source_ids: list[int]
    target_ids: list[int]
    align: Alignment
    answer_tokens: tuple[int, int]  # in the target rendering
    anchors: list[Anchor]


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


def _char_span_of_word(text: str, k: int) -> tuple[int, int] | None:
    import re

    for i, m in enumerate(re.finditer(r"\S+", text)):
        if i == k:
            return m.start(), m.end()
    return None


def correction_reads(model, traj: Trajectory, rd: Rendered, wait_char: int, wait_token: int,
                     continuation_tokens: int = 4) -> list[tuple[int, int]] | None:
    """What `correction` reads for the wait at reasoning character `wait_char` (see module doc)."""
    truth = traj.extra.get("truth") if isinstance(traj.extra, dict) else None
    r0 = rd.reasoning_chars[0]
    if isinstance(truth, dict) and "steps" in truth:
        w = word_index(traj.reasoning, wait_char)
        wait = next((x for x in truth.get("waits", []) if x.get("word") == w), None)
        step = next((s for s in truth.get("steps", []) if s.get("kind") == "wait" and s.get("word") == w), None)
        if wait is None or step is None or not wait.get("after_slip"):
            return None
        span = _char_span_of_word(traj.reasoning, w + 5)  # "wait a op b = c": c is 5 words on
        if span is None:
            return None
        ti = next((i for i, (s, e) in enumerate(rd.offsets) if e > r0 + span[0] and s < r0 + span[1]), None)
        ids = model.tokenizer(str(step["expected"]), add_special_tokens=False)["input_ids"]
        if ti is None or ti == 0 or not ids:
            return None
        return [(ti - 1, int(ids[0]))]
    t1 = rd.reasoning_tokens[1]
    reads = [(i, rd.input_ids[i + 1]) for i in range(wait_token, min(wait_token + continuation_tokens, t1))]
    return reads or None


def prepare_cases(source, target, trajectories: Sequence[Trajectory], positions: Positions | None = None, *,
                  word: str = "wait", control: bool = True, seed: int = 0,
                  continuation_tokens: int = 4) -> tuple[list[PatchCase], dict]:
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
    table = positions.table[positions.table["word"] != "<control>"]
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
            off = int(row["token_index"]) - al.target_start
            reads = correction_reads(target, gt, trd, int(row["char_start"]) - trd.reasoning_chars[0],
                                     int(row["token_index"]), continuation_tokens)
            anchors.append(Anchor(g, "none", off, reads))
            if control:
                free = [i for i in range(off) if i not in discourse]
                if free:
                    anchors.append(Anchor(g, "random", int(rng.choice(free)), reads))
        cases.append(PatchCase(traj, srd.input_ids, trd.input_ids, al, trd.answer_tokens, anchors))
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


def read_positions(case: PatchCase, patched: Sequence[int], kl_positions: int) -> Reads:
    T = len(case.target_ids)
    pos = set()
    for p in patched:
        pos.update(range(p, min(p + kl_positions, T)))
    a0, a1 = case.answer_tokens
    pos.update(range(a0 - 1, a1 - 1))
    for a in case.anchors:
        pos.update(r for r, _ in a.reads or [])
    return Reads.build(pos)
