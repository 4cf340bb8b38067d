"""`waitlens tokens` and `waitlens answers`: token signals of reasoning trajectories.

    waitlens tokens  --model SPEC [--model SPEC2 ...] --trajectories FILE.jsonl [...] --out DIR
    waitlens answers --model SPEC [--model SPEC2 ...] --trajectories FILE.jsonl [...] --out DIR

`--trajectories` is given once (every model scores the same trajectories) or once per model,
in the same order (each model its own samples, e.g. one organism regime each).

tokens writes token_table.csv / token_table.md (ranked token–correctness association per
model), token_compare.csv (difference in effect size per token, with two or more models),
wait_distribution.csv (one row per wait), wait_summary.json, token_top.png, wait_position.png.

answers writes answer_curves.csv (forced-answer probability per prefix), transitions.csv,
alignment.json (waits vs matched random positions followed by a high-confidence transition,
per model, and differences between models), answer_around_wait.png, alignment.png.
"""

from __future__ import annotations

import argparse
import json

from waitlens.experiments.cli import positive_int


def _common(p) -> None:
    p.add_argument("--model", action="append", required=True, metavar="SPEC",
                   help="model spec (repeat for several models)")
    p.add_argument("--trajectories", action="append", required=True, metavar="FILE",
                   help="trajectories JSONL (once for all models, or once per model)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--format", default=None, help="prompt format preset for every model (default: the model's)")
    p.add_argument("--lexicon", default=None, help="comma-separated discourse words (default: built-in)")
    p.add_argument("--word", default="wait", help="the discourse word studied (default wait)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N trajectories per model")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples of problems (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def register(subparsers) -> None:
    p = subparsers.add_parser("tokens", help="token–correctness association and the wait distribution",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--min-count", type=positive_int, default=5, help="test only keys with this many occurrences (default 5)")
    p.add_argument("--top", type=positive_int, default=15, help="keys per model in the figure and markdown (default 15)")
    p.set_defaults(handler=run_tokens)

    a = subparsers.add_parser("answers", help="forced-answer curves, answer transitions, wait alignment",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(a)
    a.add_argument("--suffix", default=None, help="answer-forcing suffix (default: the model format's)")
    a.add_argument("-k", "--k", type=positive_int, default=8, help="window in tokens around waits/controls (default 8)")
    a.add_argument("--every", type=positive_int, default=4, help="also a prefix every N reasoning tokens (default 4)")
    a.add_argument("--delta", type=float, default=0.3, help="gold-probability jump that counts as a transition")
    a.add_argument("--min-confidence", type=float, default=0.5,
                   help="a transition is high-confidence when the new answer's probability is at least this")
    a.add_argument("--max-answer-tokens", type=int, default=None,
                   help="greedy answer length cap (default: the gold answer's token count)")
    a.set_defaults(handler=run_answers)


def _load(args):
    """[(spec, model, trajectories)] with the trajectory files paired to the models."""
    from waitlens.hooks.models import load_model
    from waitlens.traces.trajectory import load_trajectories

    specs, files = args.model, args.trajectories
    if len(files) not in (1, len(specs)):
        raise ValueError(f"give --trajectories once, or once per --model ({len(specs)}), not {len(files)} times")
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise ValueError(f"--model {twice[0]} is given twice: results are keyed by model spec, so one would "
                         "overwrite the other; run the command once per trajectory file instead")
    files = files * len(specs) if len(files) == 1 else files
    cache: dict[str, list] = {}
    out = []
    for spec, f in zip(specs, files, strict=True):
        trajs = cache.setdefault(f, load_trajectories(f))
        if args.limit:
            trajs = trajs[: args.limit]
        model = load_model(spec, device=args.device, format=args.format)
        out.append((spec, model, trajs))
    return out


def _safe(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)


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


def run_tokens(args) -> int:
    tokens_to_dir(_load(args), args.out, lexicon=args.lexicon, word=args.word, min_count=args.min_count,
                  n_boot=args.n_boot, seed=args.seed, top=args.top)
    return 0


def tokens_to_dir(runs, out, *, lexicon=None, word="wait", min_count=5, n_boot=1000, seed=0, top=15,
                  progress=True) -> dict:
    """Token tables and the wait distribution for each (name, model, trajectories) in `runs`,
    written into `out`; returns a summary per model (the word's rank, AUROC and q)."""
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
    for spec, model, trajs in runs:
        occ = token_occurrences(model, trajs, lex, progress=progress)
        tt = token_table(occ, trajs, model=spec, lexicon=lex.words, min_count=min_count,
                         n_boot=n_boot, seed=seed)
        tables[spec], occs[spec], trajs_by[spec] = tt, occ, trajs
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pos = find_positions(model, trajs, [word])
        wd = wait_distribution(pos, trajs, model=spec, word=word)
        waits.append(wd)
        summaries[spec] = wait_summary(wd, trajs, model=spec, n_boot=n_boot, seed=seed, word=word)
        md.append(f"## {spec}\n\n{tt.n_correct} correct, {tt.n_incorrect} incorrect trajectories; "
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
    if len(tables) > 1:
        cmp = compare_regimes(occs, trajs_by, tables, n_boot=n_boot, seed=seed)
        cmp.to_csv(out / "token_compare.csv", index=False)
    wdf = pd.concat(waits, ignore_index=True)
    wdf.to_csv(out / "wait_distribution.csv", index=False)
    _write_json(out / "wait_summary.json", summaries)
    save_figure(plot_top_tokens({m: t.table for m, t in tables.items()}, n=top), out / "token_top.png")
    save_figure(plot_wait_histograms(wdf, word=word), out / "wait_position.png")
    print(f"wrote {out}/token_table.csv, token_table.md, wait_distribution.csv, wait_summary.json, figures")
    return summaries


def _pairwise(compare, by_model: dict, **kw) -> list[dict]:
    """`compare` (later model vs first) for every pair of models, in config order."""
    names = list(by_model)
    return [row for i, a in enumerate(names) for b in names[i + 1:]
            for row in compare({a: by_model[a], b: by_model[b]}, **kw)]


def run_answers(args) -> int:
    answers_to_dir(_load(args), args.out, lexicon=args.lexicon, word=args.word, suffix=args.suffix, k=args.k,
                   every=args.every, delta=args.delta, min_confidence=args.min_confidence,
                   max_answer_tokens=args.max_answer_tokens, n_boot=args.n_boot, seed=args.seed)
    return 0


def answers_to_dir(runs, out, *, lexicon=None, word="wait", suffix=None, k=8, every=4, delta=0.3,
                   min_confidence=0.5, max_answer_tokens=None, n_boot=1000, seed=0, progress=True) -> dict:
    """Forced-answer curves, transitions and wait alignment for each (name, model, trajectories)
    in `runs`, written into `out`; returns the alignment summary per model."""
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
    for spec, model, trajs in runs:
        forcing_suffix(model, suffix)  # a clear error before any work
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            disc = find_positions(model, trajs, lex)
        waits = disc.select([word])
        if len(waits) == 0:
            print(f"{spec}: no {word!r} in any trajectory: curves only, alignment undefined")
            controls = waits
        else:
            controls = control_positions(model, trajs, waits, seed=seed)
        centres: dict[str, list[int]] = {}
        for t in (disc.table, controls.table):
            for tid, ti in zip(t["trajectory_id"], t["token_index"], strict=True):
                centres.setdefault(tid, []).append(int(ti))
        curves = answer_curves(model, trajs, centres, k=k, every=every, suffix=suffix,
                               max_answer_tokens=max_answer_tokens, progress=progress)
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
