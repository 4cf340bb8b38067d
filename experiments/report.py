"""`runs/<name>/report/report.md`: the study written up from the stage outputs alone.

Every number in the report is read from a table a stage wrote, so the report can be
redrawn without re-running a model (`waitlens run --force report`). Figures are referenced
relative to the report and copied next to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from waitlens.probes.stats import wilson_ci
from waitlens.probes.tokens import to_markdown
from waitlens.traces import load_trajectories


def _ci(d: dict | None, fmt: str = ".3f") -> str:
    if not d or d.get("value") is None or not np.isfinite(d.get("value", np.nan)):
        return "n/a"
    lo, hi = d.get("lo"), d.get("hi")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return format(d["value"], fmt)
    return f"{d['value']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _row_ci(r, fmt: str = ".3f", v: str = "mean") -> str:
    return _ci({"value": r[v], "lo": r["lo"], "hi": r["hi"]}, fmt)


class _Report:
    def __init__(self, run_dir: Path, out: Path):
        self.run_dir, self.out = run_dir, out
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, stage: str, name: str, caption: str) -> None:
        src = self.run_dir / stage / name
        if not src.is_file():
            return
        (self.out / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, self.out / "figures" / f"{stage}_{name}")
        self.add(f"![{caption}](figures/{stage}_{name})", f"*{caption}*", "")

    def table(self, df: pd.DataFrame, **kw) -> None:
        self.add(to_markdown(df, **kw), "")


def write_report(run_dir: str | Path, out: str | Path) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    cfg = manifest.get("config", {})
    r = _Report(run_dir, out)
    r.add(f"# waitlens study: {cfg.get('name', run_dir.name)}", "")
    _setup(r, manifest)
    for section in (_trajectories, _tokens, _answers, _probes, _patching, _ablations):
        section(r, cfg)
    skipped = {k: v["summary"].get("reason") for k, v in manifest.get("stages", {}).items()
               if v.get("status") == "skipped"}
    if skipped:
        r.add("## Stages the data could not support", "")
        r.add(*[f"- **{k}**: {why}" for k, why in skipped.items()], "")
    r.add("## Limitations", "",
          "- CIs are 95% percentile bootstraps that resample problems; they do not account for the "
          "seed of the models' training (one training run per regime).",
          "- Capture, probes and transfer read the pooled trajectories of all models (the same text for "
          "every model); correctness is that of the text, not of the reading model.",
          "- Attribution patching is a first-order approximation; its agreement with exact patching is "
          "reported, not assumed.", "")
    path = out / "report.md"
    path.write_text("\n".join(r.lines) + "\n")
    return path


def _setup(r: _Report, manifest: dict) -> None:
    cfg = manifest.get("config", {})
    r.add("## Setup", "")
    rows = [{"name": k, "spec": v.get("spec"), "layers": manifest.get("models", {}).get(k, {}).get("n_layers"),
             "d_model": manifest.get("models", {}).get(k, {}).get("d_model")}
            for k, v in cfg.get("models", {}).items()]
    if rows:
        r.table(pd.DataFrame(rows))
    replicas = {k: f for k, f in manifest.get("models", {}).items()
                if f.get("path") and (Path(f["path"]) / "waitlens_replica.json").is_file()}
    if replicas:
        of = {k: json.loads((Path(f["path"]) / "waitlens_replica.json").read_text()).get("replica_of")
              for k, f in replicas.items()}
        r.add("**These models are replicas** (`waitlens replica`): " + ", ".join(f"{k} = {v}" for k, v in of.items())
              + " — the real tokenizer, special tokens, chat template and prompt format around small random "
              "weights. The numbers test the pipeline, not the models.", "")
    t = cfg.get("trajectories", {})
    r.add(f"Seed {cfg.get('seed')}; trajectories: {t.get('source')} ({t.get('problems')}), "
          f"{t.get('n_problems')} problems x {t.get('n_per_problem')} per model, temperature {t.get('temperature')}; "
          f"lexicon: {', '.join(cfg.get('lexicon', []))}.", "")
    stages = manifest.get("stages", {})
    if stages:
        r.add("Wall time per stage: " + ", ".join(f"{k} {v.get('seconds', 0):.1f} s" for k, v in stages.items()) + ".", "")
        cpu = {k: v["cpu_seconds"] for k, v in stages.items() if "cpu_seconds" in v}
        if cpu:  # runs recorded before the manifest kept CPU time have none
            r.add("CPU time per stage (the waitlens process): "
                  + ", ".join(f"{k} {c:.1f} s" for k, c in cpu.items()) + ".", "")
    v = manifest.get("versions", {})
    if v:
        r.add("Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", "")


def _trajectories(r: _Report, cfg: dict) -> None:
    d = r.run_dir / "trajectories"
    files = sorted(d.glob("*.jsonl")) if d.is_dir() else []
    if not files:
        return
    r.add("## Trajectories and accuracy", "")
    rows, organism = [], {}
    for f in files:
        trajs = load_trajectories(f)
        k = sum(bool(t.correct) for t in trajs)
        acc, lo, hi = wilson_ci(k, len(trajs))
        rows.append({"model": f.stem, "n": len(trajs), "accuracy": f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"})
        if trajs and "truth" in trajs[0].extra:
            organism[f.stem] = trajs
    r.table(pd.DataFrame(rows))
    if organism:
        from waitlens.experiments.organism.sample import evaluate, format_table

        r.add("Ground truth of the organism (95% Wilson CIs): how often each model slips, says \"wait\", "
              "and what its waits do.", "", format_table({m: evaluate(t) for m, t in organism.items()}), "")


def _tokens(r: _Report, cfg: dict) -> None:
    d = r.run_dir / "tokens"
    if not (d / "token_table.csv").is_file():
        return
    table = pd.read_csv(d / "token_table.csv", keep_default_na=False, na_values=[""])
    r.add("## Which tokens go with correct answers", "")
    rows = []
    for model, g in table.groupby("model", sort=False):
        w = g[g["key"] == "wait"]
        top = ", ".join(f"{k} ({a:.2f})" for k, a in zip(g["key"].head(5), g["auroc"].head(5), strict=True))
        if len(w):
            w = w.iloc[0]
            rows.append({"model": model, "wait rank": f"{int(w['rank'])}/{len(g)}",
                         "wait AUROC": _ci({"value": w["auroc"], "lo": w["auroc_lo"], "hi": w["auroc_hi"]}),
                         "wait q": f"{w['q']:.2g}", "more in": w.get("direction", ""), "top 5 (AUROC)": top})
        else:
            rows.append({"model": model, "wait rank": "not tested", "top 5 (AUROC)": top})
    r.add("AUROC of the per-trajectory count of each token for correct vs incorrect trajectories "
          "(0.5 = no association; CIs resample problems; q = Benjamini–Hochberg over all tokens tested).", "")
    r.table(pd.DataFrame(rows))
    r.figure("tokens", "token_top.png", "Top tokens by effect size, per model.")
    if (d / "wait_summary.json").is_file():
        ws = json.loads((d / "wait_summary.json").read_text())
        rows = [{"model": m, "waits/traj (correct)": _ci(s.get("waits_per_traj_correct"), ".2f"),
                 "waits/traj (incorrect)": _ci(s.get("waits_per_traj_incorrect"), ".2f"),
                 "count AUROC": _ci(s.get("count_auroc"))} for m, s in ws.items()]
        r.table(pd.DataFrame(rows))
    r.figure("tokens", "wait_position.png", "Where \"wait\" falls along the reasoning, correct vs incorrect trajectories.")


def _answers(r: _Report, cfg: dict) -> None:
    d = r.run_dir / "answers"
    if not (d / "alignment.json").is_file():
        return
    al = json.loads((d / "alignment.json").read_text())
    p = al.get("params", {})
    r.add("## Are waits followed by high-confidence answer transitions?", "",
          f"The forced-answer probability is read every {p.get('every')} tokens and around every discourse token. "
          f"A wait is *aligned* when a transition whose new answer has probability ≥ {p.get('min_confidence')} "
          f"follows within {p.get('k')} tokens; controls are matched random non-discourse positions.", "")
    rows = [{"model": m, "waits": s.get("n_waits"), "aligned waits": _ci(s.get("wait")),
             "aligned controls": _ci(s.get("control")), "excess over controls": _ci(s.get("excess"))}
            for m, s in al.get("models", {}).items()]
    r.table(pd.DataFrame(rows))
    for c in al.get("comparisons", []):
        r.add(f"- {c['model']} − {c['vs']}: difference in wait alignment {_ci(c.get('d_wait_rate'), '+.3f')}, "
              f"in excess over controls {_ci(c.get('d_excess'), '+.3f')}.")
    r.add("")
    truth = {m: s["truth"] for m, s in al.get("models", {}).items() if "truth" in s}
    if truth:
        r.add("With the organism's ground truth: a wait is a *real correction* when it follows a slip and its "
              "re-check writes the true value. Rate of waits that are aligned real corrections, and the share of "
              "aligned waits that are real corrections:", "")
        r.table(pd.DataFrame([{"model": m, "waits annotated": t.get("n_annotated"),
                               "aligned real corrections / waits": _ci(t.get("aligned_and_real")),
                               "real corrections / aligned waits": _ci(t.get("real_given_aligned"))}
                              for m, t in truth.items()]))
        for c in al.get("truth_comparisons", []):
            r.add(f"- {c['model']} − {c['vs']}: aligned real corrections per wait {_ci(c, '+.3f')}.")
        r.add("")
    r.figure("answers", "answer_around_wait.png", "Gold-answer probability around waits (aligned at the wait), with controls.")
    r.figure("answers", "alignment.png", "Fraction of waits (and controls) followed by a high-confidence transition.")


def _probes(r: _Report, cfg: dict) -> None:
    d = r.run_dir / "probes"
    if not (d / "probe_results.csv").is_file():
        return
    t = pd.read_csv(d / "probe_results.csv")
    r.add("## Do the states at discourse tokens know whether the answer will be right?", "",
          "Per-layer logistic probes on the residual stream, cross-validated with folds grouped by problem. "
          "Best layer per model and word, with its controls:", "")
    best = t.loc[t.groupby(["model", "word"])["auroc"].idxmax()]
    rows = [{"model": x.model, "word": x.word, "layer": int(x.layer),
             "AUROC": _ci({"value": x.auroc, "lo": x.auroc_lo, "hi": x.auroc_hi}),
             "random positions": f"{x.control_random_auroc:.3f}", "shuffled labels": f"{x.control_shuffled_auroc:.3f}",
             "position baseline": f"{x.baseline_auroc:.3f}", "ECE": f"{x.ece:.3f}"} for x in best.itertuples()]
    r.table(pd.DataFrame(rows))
    r.figure("probes", "probe_auroc_by_layer.png", "Probe ROC-AUC by layer per model, with control bands.")
    if (d / "truth_ceilings.csv").is_file():
        c = pd.read_csv(d / "truth_ceilings.csv")
        r.add("", "Ground-truth ceilings at \"wait\" (organism): the same cross-validated regression on ground-truth "
              "features instead of states — what a probe would reach if the states encoded exactly that fact "
              "(same rows, folds and label; margin over position alone, paired problem bootstrap):", "")
        r.table(pd.DataFrame([{"features": x.features, "AUROC": _ci({"value": x.auroc, "lo": x.auroc_lo, "hi": x.auroc_hi}),
                               "margin over position": _ci({"value": x.margin_vs_reference, "lo": x.margin_lo,
                                                            "hi": x.margin_hi}),
                               "positions": int(x.n_positions)} for x in c.itertuples()]))
    if (d / "truth_probes.csv").is_file():
        tp = pd.read_csv(d / "truth_probes.csv")
        best = tp.loc[tp.groupby(["model", "label"])["auroc"].idxmax()]
        r.add("", "Do the states at \"wait\" encode the ground truth itself? State probes for each fact "
              "(best layer, problem-grouped CV):", "")
        r.table(pd.DataFrame([{"model": x.model, "fact": x.label, "layer": int(x.layer),
                               "AUROC": _ci({"value": x.auroc, "lo": x.auroc_lo, "hi": x.auroc_hi}),
                               "shuffled labels": f"{x.control_shuffled_auroc:.3f}",
                               "position baseline": f"{x.baseline_auroc:.3f}"} for x in best.itertuples()]))
    if (d / "transfer.csv").is_file():
        r.figure("probes", "transfer_matrix.png", "Probe transfer: trained on one model's states, tested on another's.")
        r.figure("probes", "transfer_cosine.png", "Cosine similarity of probe directions across models and layers.")


def _patching(r: _Report, cfg: dict) -> None:
    d = r.run_dir / "patching"
    if not (d / "patch_effects.csv").is_file():
        return
    r.add("## Patching wait-position states between models", "",
          "Each cell replaces the target's residual stream (resid_pre) at one layer and one position relative to "
          "the wait with the source's, and measures the change after it; the control patches matched random "
          "positions the same way.", "")
    if (d / "wait_vs_random.csv").is_file():
        c = pd.read_csv(d / "wait_vs_random.csv")
        rows = []
        for (direction, metric), g in c.groupby(["direction", "metric"], sort=True):
            g = g[np.isfinite(g["mean"])]
            if g.empty:
                continue
            x = g.loc[g["mean"].abs().idxmax()]
            at = g[g["rel_pos"] == 0]
            y = at.loc[at["mean"].abs().idxmax()] if len(at) else None
            sig = int(((g["lo"] > 0) | (g["hi"] < 0)).sum())
            rows.append({"direction": direction, "metric": metric, "n waits": int(g["n"].max()),
                         "largest wait − random (layer, rel pos)":
                             f"{_row_ci(x, '+.4f')} ({int(x['layer'])}, {int(x['rel_pos']):+d})",
                         "at the wait itself (layer)": "n/a" if y is None else f"{_row_ci(y, '+.4f')} ({int(y['layer'])})",
                         "cells with CI excluding 0": f"{sig}/{len(g)}"})
        if rows:
            r.add("Paired contrast, patched wait minus its patched random control (95% CI over problems; "
                  "no CI where fewer than two problems have that cell):", "")
            r.table(pd.DataFrame(rows))
    if (d / "sampled_effects.csv").is_file():
        s = pd.read_csv(d / "sampled_effects.csv")
        rows = []
        for direction, g in s.groupby("direction", sort=True):
            clean = g[g["control"] == "clean"]
            row = {"direction": direction, "unpatched": _row_ci(clean.iloc[0], v="rate") if len(clean) else "n/a",
                   "n waits after slips": int(clean["n"].iloc[0]) if len(clean) else 0}
            for control, label in (("none", "best patched cell (layer, rel pos)"),
                                   ("random", "best random-control cell (layer, rel pos)")):
                c = g[g["control"] == control]
                if len(c):
                    x = c.loc[c["rate"].idxmax()]
                    row[label] = f"{_row_ci(x, v='rate')} ({int(x['layer'])}, {int(x['rel_pos']):+d})"
            rows.append(row)
        r.add("Sampled: after each wait that follows a slip, the patched target decodes greedily; the rate at "
              "which it writes the corrected value (patches at the wait and before it):", "")
        r.table(pd.DataFrame(rows))
    for m in ("correction", "gold_prob", "kl", "forced_answer", "next_token_kl", "recheck"):
        r.figure("patching", f"patch_heatmap_{m}.png", f"Patch effect on {m} (layer x position relative to the wait), per direction.")
    if (d / "attribution.csv").is_file():
        a = pd.read_csv(d / "attribution.csv")
        r.add("Attribution patching (one backward pass) against exact patching, Pearson r:", "")
        r.table(a)
        r.figure("patching", "attribution_vs_exact.png", "Attribution patching vs exact patching, cell by cell.")


def _ablations(r: _Report, cfg: dict) -> None:
    d = r.run_dir / "ablations"
    if not (d / "ablation_effects.csv").is_file():
        return
    a = pd.read_csv(d / "ablation_effects.csv")
    r.add("## Content or structure? Ablations within one model", "",
          f"Edits of the {cfg.get('ablations', {}).get('model')} model's own trajectories: effect = ablated − clean "
          "(for kl: the KL itself), with CIs over problems.", "")
    r.table(a, floatfmt=".4f")
    r.figure("ablations", "ablation_effects.png", "Effect of each ablation on each metric.")
