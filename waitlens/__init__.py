"""waitlens: what discourse tokens ("Wait", "so", "alternatively", ...) do inside reasoning models.

    import waitlens as wl
    model = wl.load_model("organism:post-large")
    trajs = wl.load_trajectories("trajectories.jsonl")
    pos = wl.find_positions(model, trajs, words=["wait"])

The four layers install as subpackages (`waitlens.traces`, `waitlens.hooks`, `waitlens.probes`,
`waitlens.experiments`; imports flow experiments -> probes -> hooks -> traces). This module
re-exports the verbs a notebook needs, imported on first use so `import waitlens` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# verb -> module that defines it
_VERBS = {
    "load_trajectories": "waitlens.traces",
    "save_trajectories": "waitlens.traces",
    "find_positions": "waitlens.traces",
    "grade": "waitlens.traces",
    "Trajectory": "waitlens.traces",
    "Positions": "waitlens.traces",
    "load_model": "waitlens.hooks",
    "LoadedModel": "waitlens.hooks",
    "capture": "waitlens.hooks.capture",
    "capture_residuals": "waitlens.hooks",
    "write_store": "waitlens.hooks",
    "open_store": "waitlens.hooks",
    "ActivationStore": "waitlens.hooks",
    "answer_probabilities": "waitlens.hooks",
    "token_logprobs": "waitlens.hooks",
    "patch": "waitlens.hooks",
    "fit_layer_probes": "waitlens.probes",
    "LinearProbe": "waitlens.probes",
    "token_table": "waitlens.probes",
    "load_config": "waitlens.experiments.config",
}

__all__ = sorted(_VERBS)


def __getattr__(name: str) -> Any:
    if name in _VERBS:
        value = getattr(importlib.import_module(_VERBS[name]), name)
        globals()[name] = value
        return value
    if name in ("traces", "hooks", "probes", "experiments"):
        return importlib.import_module(f"waitlens.{name}")
    raise AttributeError(f"module 'waitlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "traces", "hooks", "probes", "experiments"])
