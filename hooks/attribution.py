"""Attribution patching: a first-order estimate of every exact patch from one backward pass.

For a patch of the source's state into the target at (layer, position), the estimate is
``(a_source - a_target) · ∂metric/∂a_target``, the gradient taken at the clean target run:
one target forward plus one backward per distinct scalar metric gives every (layer, position)
cell at once. Only differentiable metrics (`PatchMetric.differentiable`) whose reads are all
on the trajectory itself are attributed; a KL has zero gradient at the clean run (its
minimum). A metric's value is taken to depend on its reads only, so cells with the same reads
share one backward. `hooks.patching.patch(..., attribution=True)` (or
`hooks.patching.attribute`) runs it beside exact patching on the same grid.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from waitlens.hooks.patch_cases import PatchCase, Reads
from waitlens.hooks.patch_metrics import MetricInput, PatchMetric, Read
from waitlens.hooks.points import decoder_of, hook_name, lm_head_of, residual_hooks

if TYPE_CHECKING:
    from waitlens.hooks.models import LoadedModel


def attribution_estimates(target: LoadedModel, case: PatchCase, layers, metrics: list[PatchMetric], all_metrics: list[PatchMetric],
                          ctx, cost) -> dict:
    """{(position, anchor group, control, rel_pos, layer, metric name): estimate} for one case.

    metrics: the differentiable ones among `all_metrics` (the order of the plan's rows).
    """
    src, tgt, patched, plan, cells = ctx
    want = {mi for mi, m in enumerate(all_metrics) if any(m is x for x in metrics)}
    # (p, local, mi) -> reads, for attributable cells
    jobs = {}
    for (p, local), row in plan.items():
        for mi in want:
            rs = row[mi]
            if rs is not None and rs and all(r.branch is None for r in rs):
                jobs[(p, local, mi)] = rs
    if not jobs:
        return {}
    reads = Reads.build(r.position for rs in jobs.values() for r in rs)
    t = time.perf_counter()
    params = [p for p in target.hf.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.tensor([case.target_ids], dtype=torch.long, device=target.device)
            deltas = {}
            fns = {}
            for layer in layers:
                def fn(h, layer=layer):
                    d = torch.zeros_like(h, requires_grad=True)
                    deltas[layer] = d
                    return h + d
                fns[hook_name(layer, "resid_pre")] = fn
            with residual_hooks(target, fns):
                hid = decoder_of(target)(input_ids=x, use_cache=False).last_hidden_state
            lp = torch.log_softmax(lm_head_of(target)(hid[0, reads.positions]).float(), -1)

            def lookup(r: Read) -> Tensor:
                return lp[reads.index[r.position]]

            scalars: dict[tuple, Tensor] = {}
            key_of = {}
            for (p, local, mi), rs in jobs.items():
                key = (mi, tuple(rs))
                key_of[(p, local, mi)] = key
                if key not in scalars:
                    ai = cells[p][local][0]
                    scalars[key] = all_metrics[mi](MetricInput(target, case, case.anchors[ai], p, rs, lookup, lookup))
            ds = [deltas[layer] for layer in layers]
            grads = {}
            keys = list(scalars)
            for n, key in enumerate(keys):
                g = torch.autograd.grad(scalars[key], ds, retain_graph=n < len(keys) - 1)
                grads[key] = torch.stack([gi[0, patched] for gi in g])  # [layer, n_patched, d]
                cost["backward_passes"] += 1
    finally:
        for p in params:
            p.requires_grad_(True)
    diff = (src - tgt).float()  # [layer, n_patched, d]
    est = {key: (diff * g).sum(-1) for key, g in grads.items()}  # [layer, n_patched]
    col = {p: k for k, p in enumerate(patched)}
    out = {}
    for (p, local, mi), key in key_of.items():
        ai, rel = cells[p][local]
        a = case.anchors[ai]
        for li, layer in enumerate(layers):
            out[(p, a.group, a.control, rel, layer, all_metrics[mi].name)] = float(est[key][li, col[p]])
    cost["attribution_s"] += time.perf_counter() - t
    return out
