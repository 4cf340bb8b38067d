"""A batched solver for many L2-regularized logistic regressions that share one design matrix.

Probing every layer of a model with nested cross-validation means hundreds of small logistic
regressions on the same rows: layers x inner folds x regularization strengths. Fitting them
one at a time (scikit-learn's habit) spends its time in matrix-vector products; here they are
fitted together, as one truncated-Newton (Newton-CG) iteration over the whole batch, so every
product is a matrix-matrix product. Each problem keeps its own conjugate-gradient scalars,
step length and stopping test, so the batch solves exactly the problems it would solve one
by one (the objective is strictly convex: the optimum is unique).

Problem q at layer l minimizes, over (w, b),

    (1 / N_q) * sum_i m_qi * [log(1 + exp(z_i)) - y_qi * z_i]  +  lam_lq / 2 * ||w||^2,
    z_i = x_li . w + b,   N_q = sum_i m_qi,

the objective of scikit-learn's ``LogisticRegression(C)`` divided by ``C * N_q`` (so
``lam = 1 / (C * N_q)``), intercept unpenalized.
"""

from __future__ import annotations

from typing import no_type_check

import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn.functional import softplus


def _dot(a: Tensor, b: Tensor, ab: Tensor, bb: Tensor) -> Tensor:
    """Inner product of stacked (w [L, d, Q], b [L, Q]) pairs, per problem: [L, Q]."""
    return (a * b).sum(1) + ab * bb


def fit_logistic_batched(
    X: Float[Tensor, "layer n d"],
    Y: Float[Tensor, "n q"] | Float[Tensor, "layer n q"],
    M: Float[Tensor, "n q"],
    lam: Float[Tensor, "layer q"] | Float[Tensor, " q"],
    *,
    W0: Float[Tensor, "layer d q"] | None = None,
    b0: Float[Tensor, "layer q"] | None = None,
    tol: float = 1e-9,
    max_newton: int = 60,
    max_cg: int = 250,
) -> tuple[Float[Tensor, "layer d q"], Float[Tensor, "layer q"], dict]:
    """Minimize every (layer, problem) objective above; returns (W, b, info).

    X: features per layer (standardize them first: the solver's conditioning relies on it);
    Y: 0/1 labels per problem (shared by all layers, or per layer); M: 0/1 (or nonnegative)
    row weights per problem, 0 = row not in this problem's training set; lam: L2 strength.
    Stops when every problem's gradient norm is below `tol` (or after `max_newton` steps);
    `info` has the number of Newton steps and the final worst gradient norm.
    """
    L, n, d = X.shape
    Q = M.shape[-1]
    dt = X.dtype
    M = M.to(dt)
    N = M.sum(0).clamp_min(1.0)
    Mn = M / N  # [n, Q]
    Y = Y.to(dt)
    lam = torch.as_tensor(lam, dtype=dt).expand(L, Q).clone()
    if W0 is None:
        W = torch.zeros(L, d, Q, dtype=dt)
    else:
        W = W0.to(dt).clone()
    if b0 is None:
        prior = (Mn * Y).sum(-2).clamp(1e-6, 1 - 1e-6)  # [Q] or [L, Q]
        b = torch.logit(prior).expand(L, Q).clone()
    else:
        b = b0.to(dt).clone()
    Xt = X.transpose(1, 2)  # [L, d, n]
    slack = 16 * torch.finfo(dt).eps  # objective differences below this are rounding
    evals, evecs = torch.linalg.eigh(torch.bmm(Xt, X) / n)  # for the preconditioner
    evals = evals.clamp_min(0)
    evecsT = evecs.transpose(1, 2)

    @no_type_check
    def objective(W, b):
        Z = torch.baddbmm(b[:, None, :], X, W)  # [L, n, Q]
        f = (Mn * (softplus(Z) - Y * Z)).sum(1) + 0.5 * lam * (W * W).sum(1)
        return f, Z

    f, Z = objective(W, b)
    gmax = float("inf")
    steps = cg_total = 0
    for steps in range(1, max_newton + 1):  # noqa: B007
        P = torch.sigmoid(Z)
        R = Mn * (P - Y)
        S = Mn * P * (1 - P)  # Hessian row weights [L, n, Q]
        gW = torch.bmm(Xt, R) + lam[:, None, :] * W
        gb = R.sum(1)
        gnorm = _dot(gW, gW, gb, gb).sqrt()
        gmax = float(gnorm.max())
        active = gnorm > tol
        if not bool(active.any()):
            break

        @no_type_check
        def hess(vW, vb, S=S):
            SU = S * torch.baddbmm(vb[:, None, :], X, vW)
            return torch.bmm(Xt, SU) + lam[:, None, :] * vW, SU.sum(1)

        # Preconditioned conjugate gradients on H p = -g, per problem, forcing term
        # min(0.5, sqrt|g|) |g|. Preconditioner: the Hessian with every row's curvature replaced
        # by the problem's mean, s_q * cov(X) + lam_q, applied in cov(X)'s eigenbasis.
        s_bar = S.sum(1)  # [L, Q]
        inv = 1.0 / (s_bar[:, None, :] * evals[:, :, None] + lam[:, None, :])  # [L, d, Q]

        @no_type_check
        def precond(vW, vb, inv=inv, s_bar=s_bar):
            return torch.bmm(evecs, inv * torch.bmm(evecsT, vW)), vb / s_bar.clamp_min(1e-12)

        target = torch.minimum(torch.full_like(gnorm, 0.5), gnorm.sqrt()) * gnorm
        pW, pb = torch.zeros_like(W), torch.zeros_like(b)
        rW, rb = -gW, -gb
        zW, zb = precond(rW, rb)
        dW, db = zW.clone(), zb.clone()
        rz = _dot(rW, zW, rb, zb)
        cg_on = active.clone()
        for _ in range(max_cg):
            cg_total += 1
            HdW, Hdb = hess(dW, db)
            dHd = _dot(dW, HdW, db, Hdb)
            alpha = torch.where(cg_on, rz / dHd.clamp_min(1e-300), torch.zeros_like(rz))
            pW += alpha[:, None, :] * dW
            pb += alpha * db
            rW -= alpha[:, None, :] * HdW
            rb -= alpha * Hdb
            cg_on &= _dot(rW, rW, rb, rb).sqrt() > target
            if not bool(cg_on.any()):
                break
            zW, zb = precond(rW, rb)
            rz_new = _dot(rW, zW, rb, zb)
            beta = torch.where(cg_on, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
            dW = zW + beta[:, None, :] * dW
            db = zb + beta * db
            rz = torch.where(cg_on, rz_new, rz)

        # Backtracking (Armijo) line search, one step length per problem.
        slope = _dot(gW, pW, gb, pb)
        t = active.to(dt)
        for _ in range(40):
            fn, Zn = objective(W + t[:, None, :] * pW, b + t * pb)
            ok = (fn <= f + 1e-4 * t * slope + slack * (f.abs() + 1)) | (t == 0)
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
        else:  # no decrease for some problems: leave them where they are
            t = torch.where(ok, t, torch.zeros_like(t))
            fn, Zn = objective(W + t[:, None, :] * pW, b + t * pb)
        W = W + t[:, None, :] * pW
        b = b + t * pb
        f, Z = fn, Zn
        if not bool((t > 0).any()):  # stalled: every active problem is at rounding level
            break
    return W, b, {"newton_steps": steps, "cg_steps": cg_total, "max_grad": gmax}
