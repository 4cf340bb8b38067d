"""Where the shipped organism weights live: ``organism:<regime>`` -> a local HF directory.

Registered as the ``organism`` entry point of the ``waitlens.models`` group, so
``hooks.load_model("organism:sft-1k")`` finds it without hooks/ importing experiments/.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# the default pair is fine-tuned on `task.TRACE_CORPUS`, the vigilant pair on `task.VIGILANT_CORPUS`
REGIMES = ("base", "sft-1k", "post-large", "sft-1k-vigilant", "post-large-vigilant")


def regime_dir(variant: str) -> Path:
    """Where one regime's weights are shipped (whether or not they are there)."""
    variant = str(variant).strip()
    if variant not in REGIMES:
        raise ValueError(f"unknown organism variant {variant!r}; valid variants: {', '.join(REGIMES)}")
    return WEIGHTS_DIR / variant


def resolve(variant: str) -> Path:
    """The shipped directory of one regime; ValueError for an unknown variant."""
    path = regime_dir(variant)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"organism weights for {variant!r} are missing at {path}; "
            "run `waitlens organism train` to rebuild them"
        )
    return path
