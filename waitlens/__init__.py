"""waitlens: what discourse tokens ("Wait", "so", "alternatively", ...) do inside reasoning models.

    import waitlens as wl
    model = wl.load_model("organism:post-large")
    trajs = wl.sample_organism(model, 400)
    pos = wl.find_positions(model, trajs, ["wait"])
    states, meta = wl.capture(model, trajs, pos)

The four layers install as subpackages (`waitlens.traces`, `waitlens.hooks`, `waitlens.probes`,
`waitlens.experiments`; imports flow experiments -> probes -> hooks -> traces). This module
re-exports the verbs a notebook needs, imported on first use so `import waitlens` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# verb -> "module:attribute" that defines it
_VERBS = {
    # traces: trajectories, real outputs, positions (tokenizers only)
    "load_trajectories": "waitlens.traces:load_trajectories",
    "save_trajectories": "waitlens.traces:save_trajectories",
    "import_records": "waitlens.traces.importing:import_records",
    "find_positions": "waitlens.traces:find_positions",
    "control_positions": "waitlens.traces:control_positions",
    "Trajectory": "waitlens.traces:Trajectory",
    "Positions": "waitlens.traces:Positions",
    # hooks: models and every forward pass
    "load_model": "waitlens.hooks:load_model",
    "LoadedModel": "waitlens.hooks:LoadedModel",
    "replica": "waitlens.hooks.replica:replica",
    "capture": "waitlens.hooks.capture:capture",
    "capture_to_store": "waitlens.hooks:capture_residuals",
    "open_store": "waitlens.hooks:open_store",
    "ActivationStore": "waitlens.hooks:ActivationStore",
    "answer_probabilities": "waitlens.hooks:answer_probabilities",
    "token_logprobs": "waitlens.hooks:token_logprobs",
    "patch": "waitlens.hooks:patch",
    # probes: learning and statistics, no forward passes
    "fit_layer_probes": "waitlens.probes:fit_layer_probes",
    "LinearProbe": "waitlens.probes:LinearProbe",
    "token_table": "waitlens.probes:token_table",
    # experiments: whole studies, and the organism
    "run_study": "waitlens.experiments.analyses.study:run",
    "sample_organism": "waitlens.experiments.organism.sample:sample",
}

__all__ = sorted(_VERBS)


def __getattr__(name: str) -> Any:
    if name in _VERBS:
        module, attr = _VERBS[name].split(":")
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in ("traces", "hooks", "probes", "experiments"):
        return importlib.import_module(f"waitlens.{name}")
    raise AttributeError(f"module 'waitlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "traces", "hooks", "probes", "experiments"])
