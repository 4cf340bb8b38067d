"""Attribution patching: a first-order estimate of every exact patch from one backward pass.

For a patch of the source's state into the target at (layer, position), the estimate is
``(a_source - a_target) · ∂metric/∂a_target``, the gradient taken at the clean target run:
one target forward plus one backward per scalar metric gives every (layer, position) cell at
once. ``kl`` has zero gradient at the clean run (its minimum), so only ``correction`` and
``gold_prob`` are attributed. `hooks.patching.patch(..., attribution=True)` (or
`hooks.patching.attribute`) runs it beside exact patching on the same grid.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from waitlens.hooks.patch_cases import PatchCase, Reads
from waitlens.hooks.points import decoder_of, hook_name, lm_head_of, residual_hooks


def attribution_estimates(target, case: PatchCase, layers, window, metrics, ctx, cost) -> dict:
    """{(group, control, layer, rel_pos, metric): estimate} for one case."""
    if not metrics:
        return {}
    src, tgt, patched = ctx
    reads = _differentiable_reads(case, metrics)
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
            scalars: dict[tuple, Tensor] = {}
            if "gold_prob" in metrics:
                a0, a1 = case.answer_tokens
                scalars[("gold_prob", None)] = torch.stack(
                    [lp[reads.index[i - 1], case.target_ids[i]] for i in range(a0, a1)]).sum().exp()
            if "correction" in metrics:
                seen = {}
                for a in case.anchors:
                    if a.reads:
                        key = tuple(a.reads)
                        if key not in seen:
                            seen[key] = torch.stack([lp[reads.index[r], tok] for r, tok in a.reads]).exp().mean()
                for key, v in seen.items():
                    scalars[("correction", key)] = v
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
    for a in case.anchors:
        for rel in range(window[0], window[1] + 1):
            off = a.offset + rel
            if not 0 <= off < case.align.n_reasoning:
                continue
            k = col[case.align.target_start + off]
            for li, layer in enumerate(layers):
                if ("gold_prob", None) in est:
                    out[(a.group, a.control, layer, rel, "gold_prob")] = float(est[("gold_prob", None)][li, k])
                if a.reads and ("correction", tuple(a.reads)) in est:
                    out[(a.group, a.control, layer, rel, "correction")] = float(
                        est[("correction", tuple(a.reads))][li, k])
    cost["attribution_s"] += time.perf_counter() - t
    return out


def _differentiable_reads(case: PatchCase, metrics) -> Reads:
    """Only the positions the attributed metrics read (not the KL windows exact patching also
    reads): with a 150k-word vocabulary the log-softmax there is most of the backward."""
    pos: set[int] = set()
    if "gold_prob" in metrics:
        a0, a1 = case.answer_tokens
        pos.update(range(a0 - 1, a1 - 1))
    if "correction" in metrics:
        for a in case.anchors:
            pos.update(r for r, _ in a.reads or [])
    return Reads.build(pos)
