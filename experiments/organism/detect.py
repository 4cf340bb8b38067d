"""Does an organism model know, right after writing a step, that the step was wrong?

A teacher-forced diagnostic, seconds per model (`waitlens organism detect`):

- **detection**: on held-out problems written with 30% slips and no discourse words, the
  model's probability that the next word is "wait" at each step's value token (where it
  decides whether to re-check; the last step included, as the corpora re-check it too). ROC-AUC of that probability for slipped vs correct steps
  (a problem-bootstrap CI): 0.5 = it says "wait" blind to the step; 1 = it detects slips.
- **logit lens**: at each "=" before a trace's first slip, the share of steps whose value the
  residual stream after each layer (final norm + unembedding) already predicts. Detection
  has to compare the value written with a recomputed one; if only the last layer holds the
  value at "=", the next position has no layer left to read it and compare.

Sampling statistics (`organism eval`) answer whether the model *behaves* as a detector; this
answers whether its next-word distribution sees the slip at all, free of sampling noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from waitlens.experiments.organism.task import TOKEN_ID, CorpusSpec, make_trace, random_problem

if TYPE_CHECKING:
    from torch import nn

    from waitlens.hooks.models import LoadedModel

PROBE_CORPUS = CorpusSpec("detect", slip=0.3)  # plain steps, no discourse words


def detection(model: LoadedModel | nn.Module, n: int = 400, seed: int = 123, n_boot: int = 1000) -> dict[str, Any]:
    """Teacher-forced slip detection and the per-layer logit lens of one organism model."""
    import torch

    with torch.no_grad():
        return _detection(model, n, seed, n_boot)


def _detection(model, n: int, seed: int, n_boot: int) -> dict[str, Any]:
    import torch

    from waitlens.experiments.organism.model import encode
    from waitlens.probes.metrics import auroc_ci

    hf = model.hf if hasattr(model, "hf") else model
    rng = np.random.default_rng(seed)
    scores, slipped, groups = [], [], []
    lens_hits, lens_n = None, 0
    for i in range(n):
        p = random_problem(rng, split="eval")
        reasoning, answer, planted = make_trace(p, PROBE_CORPUS, rng)
        ids, n_head = encode(p, reasoning, answer)
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        prob = out.logits[0].softmax(-1)
        eqs = [j for j in range(n_head, len(ids)) if ids[j] == TOKEN_ID["="]]
        if lens_hits is None:
            lens_hits = np.zeros(len(out.hidden_states) - 1)
        for k, e in enumerate(eqs):
            scores.append(float(prob[e + 1, TOKEN_ID["wait"]]))
            slipped.append(k in planted["slips"])
            groups.append(i)
            if k in planted["slips"] or k > min(planted["slips"], default=len(eqs)):
                continue  # the lens reads steps whose operands and value are all right
            for layer, h in enumerate(out.hidden_states[1:]):
                h = h[0, e] if layer == len(out.hidden_states) - 2 else hf.model.norm(h[0, e])
                lens_hits[layer] += int(hf.lm_head(h).argmax() == ids[e + 1])
            lens_n += 1
    s, y = np.array(scores), np.array(slipped)
    a, lo, hi = auroc_ci(y.astype(int), s, np.array(groups), n_boot=n_boot, seed=seed)
    return {"detection_auroc": {"value": a, "lo": lo, "hi": hi}, "p_wait_after_slip": float(s[y].mean()),
            "p_wait_after_correct": float(s[~y].mean()), "n_steps": int(len(y)), "n_slips": int(y.sum()),
            "lens_by_layer": [float(x) for x in lens_hits / max(lens_n, 1)], "lens_steps": lens_n}


def format_detection(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'model':<22} {'detection AUROC':<24} {'P(wait|slip)':>12} {'P(wait|ok)':>11}  value at '=' by layer"]
    for spec, r in results.items():
        d = r["detection_auroc"]
        lens = " ".join(f"{x:.2f}" for x in r["lens_by_layer"])
        lines.append(f"{spec:<22} {d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]    "
                     f"{r['p_wait_after_slip']:>12.3f} {r['p_wait_after_correct']:>11.3f}  {lens}")
    return "\n".join(lines)
