"""Token signals of reasoning trajectories: the library side of `waitlens tokens` / `waitlens
answers` and of the study's tokens and answers stages.

`tokens_to_dir` writes token_table.csv / token_table.md (ranked token–correctness association
per model), token_compare.csv (differences in effect size between models that share
problems), wait_by_model.csv / .md (one row per model: the word's rank, AUROC, CI, q, rates,
accuracy: the comparison across training setups), wait_distribution.csv, wait_summary.json,
token_top.png and wait_position.png. A model without weights (`traces.tokenizers.
TokenizerModel`) gets counts only: the occurrences come from its exact tokenization, and the
probability columns are blank.

`answers_to_dir` writes answer_curves.csv, transitions.csv, alignment.json and figures (needs
weights).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import pandas as pd

from waitlens.traces.lexicon import Lexicon
from waitlens.traces.trajectory import Trajectory

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel
    from waitlens.traces.tokenizers import TokenizerModel

WAIT_BY_MODEL_COLUMNS = [
    "model", "n_trajectories", "n_correct", "accuracy", "n_keys", "rank", "n_occurrences", "auroc",
    "auroc_lo", "auroc_hi", "q", "direction", "waits_per_traj_correct", "waits_per_traj_incorrect",
    "present_correct", "present_incorrect", "frac_mean_correct", "frac_mean_incorrect", "note",
]


def has_weights(model: LoadedModel | TokenizerModel) -> bool:
    return bool(getattr(model, "has_weights", True))


def count_occurrences(
    model: LoadedModel | TokenizerModel,
    trajectories: Sequence[Trajectory],
    lexicon: Lexicon | Iterable[str] | str | None = None,
    *,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`hooks.token_occurrences` without a forward pass: the same rows (a lexicon word is one
    occurrence however many tokens it spans; other tokens keyed by their stripped text) from
    the model's exact tokenization, with ``logprob`` NaN; and the positions table of the
    lexicon words (as `find_positions` gives it), from the same single tokenization.
    `model` is anything with ``render`` and ``tokenizer`` (a weightless `TokenizerModel`)."""
    from waitlens.hooks.logprobs import TokenKeys, occurrence_block, occurrence_table
    from waitlens.traces.positions import COLUMNS, position_rows, positions_table

    lex = Lexicon.parse(lexicon)
    tok = getattr(model, "tokenizer", model)
    check_length = getattr(model, "check_length", None)
    key = TokenKeys(tok)
    blocks = []
    pos_rows = []
    it: Iterable = trajectories
    if progress:
        from tqdm import tqdm

        it = tqdm(trajectories, desc=f"token counts {getattr(model, 'spec', '')}")
    for traj in it:
        rd = model.render(traj)
        if check_length is not None:
            check_length(rd.n_tokens, traj.id)
        pos = position_rows(traj, rd, lex)  # positions_in's rows, typed once at the end
        pos_rows += pos
        t0, t1 = rd.reasoning_tokens
        if t1 > t0:
            blocks.append(occurrence_block(traj, rd.input_ids, t0, t1,
                                           ((r["word"], r["span_start"], r["span_end"]) for r in pos), key))
    positions = positions_table(pos_rows) if pos_rows else pd.DataFrame(columns=COLUMNS)
    return occurrence_table(blocks), positions


def wait_by_model(tables: dict, summaries: dict, waits: pd.DataFrame, *, word: str = "wait") -> pd.DataFrame:
    """One row per model: the word's row of its token table (rank among the keys tested,
    AUROC with its problem-bootstrap CI, BH q), waits per trajectory by class, and where in the
    reasoning the waits sit (mean fraction) by class."""
    rows = []
    for spec, tt in tables.items():
        s = summaries.get(spec, {})
        n_c, n_i = tt.n_correct, tt.n_incorrect
        row = {"model": spec, "n_trajectories": n_c + n_i, "n_correct": n_c,
               "accuracy": n_c / max(n_c + n_i, 1), "n_keys": len(tt.table)}
        hit = tt.table[tt.table["key"] == word]
        if hit.empty:
            row["note"] = "; ".join(n for n in tt.notes if repr(word) in n) or f"{word!r} absent"
        else:
            r = hit.iloc[0]
            row.update({k: r[k] for k in ("rank", "n_occurrences", "auroc", "auroc_lo", "auroc_hi", "q",
                                          "direction", "present_correct", "present_incorrect")})
            row["note"] = r["note"]
        for cls in ("correct", "incorrect"):
            v = s.get(f"waits_per_traj_{cls}", {})
            row[f"waits_per_traj_{cls}"] = v.get("value") if isinstance(v, dict) else None
        w = waits[waits["model"] == spec] if len(waits) else waits
        for cls, flag in (("correct", True), ("incorrect", False)):
            sel = w[w["correct"] == flag]["frac"] if len(w) else []
            row[f"frac_mean_{cls}"] = float(sel.mean()) if len(sel) else None
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=WAIT_BY_MODEL_COLUMNS)


def _write_json(path, obj) -> None:
    import math

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if hasattr(x, "item"):
            return clean(x.item())
        return x

    path.write_text(json.dumps(clean(obj), indent=2) + "\n")


def tokens_to_dir(runs, out, *, lexicon=None, word="wait", min_count=5, n_boot=1000, seed=0, top=15,
                  progress=True, compare: Sequence[Sequence[str]] | None = None, workers: int = 1) -> dict:
    """Token tables and the wait distribution for each (name, model, trajectories) in `runs`,
    written into `out`; returns a summary per model (the word's rank, AUROC and q).

    compare: groups of names whose token tables are compared (models that share problems,
    e.g. three training variants on the same 30 AIME problems); default: all models, one group.
    A model without weights is counted from its tokenization (probability columns blank).
    workers: the models' forwards (token log-probs) run in up to this many forked processes on
    one torch thread each (`experiments.parallel.map_fork`)."""
    from pathlib import Path

    import pandas as pd

    from waitlens.experiments.plots import save_figure
    from waitlens.experiments.plots.tokens import plot_top_tokens, plot_wait_histograms
    from waitlens.hooks.logprobs import token_occurrences
    from waitlens.probes.tokens import (
        compare_regimes,
        to_markdown,
        token_table,
        wait_distribution,
        wait_summary,
    )
    from waitlens.traces import Lexicon, find_positions

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lex = Lexicon.parse(lexicon)
    word = word.lower()
    if word not in lex:
        lex = Lexicon([*lex.words, word])
    tables, occs, trajs_by, waits, summaries = {}, {}, {}, [], {}
    md = []
    from waitlens.experiments.parallel import map_fork

    weighted = [has_weights(model) for _, model, _ in runs]
    # the weighted runs' forwards in workers; each result is taken back in the runs' order
    forwards = iter(map_fork(lambda run: token_occurrences(run[1], run[2], lex, progress=progress),
                             [run for run, w in zip(runs, weighted, strict=True) if w], workers))
    for (spec, model, trajs), has_w in zip(runs, weighted, strict=True):
        counted = None
        if has_w:
            occ = next(forwards)
        else:
            occ, counted = count_occurrences(model, trajs, lex, progress=progress)
        tt = token_table(occ, trajs, model=spec, lexicon=lex.words, min_count=min_count,
                         n_boot=n_boot, seed=seed)
        tables[spec], occs[spec], trajs_by[spec] = tt, occ, trajs
        import warnings

        if counted is not None:  # the word's rows of the same tokenization (it is in the lexicon)
            pos = counted[counted["word"] == word]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pos = find_positions(model, trajs, [word])
        wd = wait_distribution(pos, trajs, model=spec, word=word)
        waits.append(wd)
        summaries[spec] = wait_summary(wd, trajs, model=spec, n_boot=n_boot, seed=seed, word=word)
        md.append(f"## {spec}\n\n{'' if has_w else '(counts only: no model weights) '}"
                  f"{tt.n_correct} correct, {tt.n_incorrect} incorrect trajectories; "
                  f"{len(tt.table)} keys tested (min count {min_count}).\n")
        show = tt.table.head(top)[["rank", "key", "kind", "n_occurrences", "rate_correct", "rate_incorrect",
                                        "prob_correct", "prob_incorrect", "auroc", "auroc_lo", "auroc_hi",
                                        "q", "note"]]
        md.append(to_markdown(show))
        md += [f"- {n}" for n in tt.notes] + [""]
        r = tt.table[tt.table["key"] == word]
        if r.empty:
            print(f"{spec}: {word!r} not tested ({'; '.join(n for n in tt.notes if repr(word) in n) or 'absent'})")
        else:
            r = r.iloc[0]
            print(f"{spec}: {word!r} rank {r['rank']}/{len(tt.table)}, AUROC {r['auroc']:.3f} "
                  f"[{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}], q {r['q']:.2g} (more in {r['direction']})")
        for n in tt.notes:
            print(f"{spec}: note: {n}")
    pd.concat([t.table for t in tables.values()], ignore_index=True).to_csv(out / "token_table.csv", index=False)
    (out / "token_table.md").write_text("# Token–correctness association\n\n" + "\n".join(md))
    groups = [list(g) for g in compare] if compare is not None else [list(tables)]
    unknown = sorted({m for g in groups for m in g} - set(tables))
    if unknown:
        raise ValueError(f"compare names model(s) {unknown} that are not in this run ({sorted(tables)})")
    cmps = []
    for g in groups:
        if len(g) > 1:
            cmp = compare_regimes({m: occs[m] for m in g}, {m: trajs_by[m] for m in g},
                                  {m: tables[m] for m in g}, n_boot=n_boot, seed=seed)
            cmps.append(cmp.assign(group=" vs ".join(g)) if compare is not None else cmp)
    if cmps:
        pd.concat(cmps, ignore_index=True).to_csv(out / "token_compare.csv", index=False)
    wdf = pd.concat(waits, ignore_index=True)
    by_model = wait_by_model(tables, summaries, wdf, word=word)
    by_model.to_csv(out / "wait_by_model.csv", index=False)
    (out / "wait_by_model.md").write_text(f"# {word!r} across models\n\n" + to_markdown(by_model) + "\n")
    wdf.to_csv(out / "wait_distribution.csv", index=False)
    _write_json(out / "wait_summary.json", summaries)
    save_figure(plot_top_tokens({m: t.table for m, t in tables.items()}, n=top), out / "token_top.png")
    save_figure(plot_wait_histograms(wdf, word=word), out / "wait_position.png")
    print(f"wrote {out}/token_table.csv, token_table.md, wait_by_model.csv, wait_distribution.csv, "
          "wait_summary.json, figures")
    return summaries


def _pairwise(compare, by_model: dict, **kw) -> list[dict]:
    """`compare` (later model vs first) for every pair of models, in config order."""
    names = list(by_model)
    return [row for i, a in enumerate(names) for b in names[i + 1:]
            for row in compare({a: by_model[a], b: by_model[b]}, **kw)]


def answers_to_dir(runs, out, *, lexicon=None, word="wait", suffix=None, k=8, every=4, delta=0.3,
                   min_confidence=0.5, max_answer_tokens=None, n_boot=1000, seed=0, progress=True,
                   workers: int = 1) -> dict:
    """Forced-answer curves, transitions and wait alignment for each (name, model, trajectories)
    in `runs`, written into `out`; returns the alignment summary per model. workers: the models'
    forced-answer curves run in up to this many forked processes on one torch thread each
    (`experiments.parallel.map_fork`)."""
    import warnings
    from pathlib import Path

    import pandas as pd

    from waitlens.experiments.plots import save_figure
    from waitlens.experiments.plots.tokens import plot_alignment, plot_curves_around
    from waitlens.hooks.answer import answer_curves, forcing_suffix
    from waitlens.probes.transitions import (
        align_events,
        alignment_summary,
        annotate_truth,
        compare_alignment,
        compare_rates,
        curves_around,
        find_transitions,
        truth_alignment,
    )
    from waitlens.traces import Lexicon, control_positions, find_positions

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lex = Lexicon.parse(lexicon)
    word = word.lower()
    all_curves, all_tr, summaries, events, around, truth_rates = [], [], {}, {}, {}, {}
    for _, model, _ in runs:
        forcing_suffix(model, suffix)  # a clear error before any work

    def positions_and_curves(run):
        _, model, trajs = run
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            disc = find_positions(model, trajs, lex)
        waits = disc.select([word])
        controls = waits if len(waits) == 0 else control_positions(model, trajs, waits, seed=seed)
        centres: dict[str, list[int]] = {}
        for t in (disc.table, controls.table):
            for tid, ti in zip(t["trajectory_id"], t["token_index"], strict=True):
                centres.setdefault(tid, []).append(int(ti))
        curves = answer_curves(model, trajs, centres, k=k, every=every, suffix=suffix,
                               max_answer_tokens=max_answer_tokens, progress=progress)
        return waits, controls, curves

    from waitlens.experiments.parallel import map_fork

    for (spec, _, trajs), (waits, controls, curves) in zip(runs, map_fork(positions_and_curves, runs, workers),
                                                             strict=True):
        if len(waits) == 0:
            print(f"{spec}: no {word!r} in any trajectory: curves only, alignment undefined")
        curves.insert(0, "model", spec)
        tr = find_transitions(curves, delta=delta)
        tr.insert(0, "model", spec)
        w = align_events(tr, waits.table, k=k, min_confidence=min_confidence, curves=curves)
        c = align_events(tr, controls.table, k=k, min_confidence=min_confidence, curves=curves)
        summaries[spec] = alignment_summary(w, c, model=spec, n_boot=n_boot, seed=seed)
        truth = {t.id: t.extra["truth"].get("waits", []) for t in trajs
                 if isinstance(t.extra.get("truth"), dict) and word == "wait"}
        if truth and len(w):  # ground truth shipped with the trajectories (the organism)
            w = annotate_truth(w, truth)
            summaries[spec]["truth"] = ta = truth_alignment(w, n_boot=n_boot, seed=seed)
            if "aligned_and_real" in ta:
                ok = w["real_correction"].notna().to_numpy()
                truth_rates[spec] = ((w["aligned"] & w["real_correction"].fillna(False)).to_numpy(bool)[ok],
                                     w["problem_id"].to_numpy()[ok])
                r = ta["aligned_and_real"]
                print(f"{spec}: ground truth: waits aligned with a real correction {r['value']:.3f} "
                      f"[{r['lo']:.3f}, {r['hi']:.3f}] (real corrections: {ta['real_correction']['value']:.3f})")
        events[spec] = (w, c)
        around[spec] = {"wait": curves_around(curves, w, k=k, seed=seed),
                        "control": curves_around(curves, c, k=k, seed=seed)} if len(w) else {}
        s = summaries[spec]
        if "wait" in s:
            print(f"{spec}: {s['n_waits']} waits; aligned {s['wait']['value']:.3f} [{s['wait']['lo']:.3f}, "
                  f"{s['wait']['hi']:.3f}] vs controls {s['control']['value']:.3f} "
                  f"[{s['control']['lo']:.3f}, {s['control']['hi']:.3f}]")
        all_curves.append(curves)
        all_tr.append(tr)
    pd.concat(all_curves, ignore_index=True).to_csv(out / "answer_curves.csv", index=False)
    pd.concat(all_tr, ignore_index=True).to_csv(out / "transitions.csv", index=False)
    result = {"params": {"k": k, "every": every, "delta": delta,
                         "min_confidence": min_confidence, "word": word, "n_boot": n_boot},
              "models": summaries}
    usable = {m: e for m, e in events.items() if len(e[0]) and len(e[1])}
    if len(usable) > 1:
        result["comparisons"] = _pairwise(compare_alignment, usable, n_boot=n_boot, seed=seed)
        for r in result["comparisons"]:
            d = r["d_wait_rate"]
            print(f"{r['model']} - {r['vs']}: wait alignment {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    if len(truth_rates) > 1:
        result["truth_comparisons"] = _pairwise(compare_rates, truth_rates, n_boot=n_boot, seed=seed)
        for r in result["truth_comparisons"]:
            print(f"{r['model']} - {r['vs']}: waits aligned with a real correction {r['value']:+.3f} "
                  f"[{r['lo']:+.3f}, {r['hi']:+.3f}]")
    _write_json(out / "alignment.json", result)
    pd.concat([pd.concat([w.assign(model=m, event="wait"), c.assign(model=m, event="control")])
               for m, (w, c) in events.items()], ignore_index=True).to_csv(out / "alignment_events.csv", index=False)
    if any(around.values()):
        save_figure(plot_curves_around({m: a for m, a in around.items() if a}), out / "answer_around_wait.png")
    save_figure(plot_alignment({m: s for m, s in summaries.items() if "wait" in s}), out / "alignment.png")
    print(f"wrote {out}/answer_curves.csv, transitions.csv, alignment.json, figures")
    return summaries
