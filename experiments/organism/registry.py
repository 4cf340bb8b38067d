"""Where the shipped organism weights live: ``organism:<regime>`` -> a local HF directory.

Registered as the ``organism`` entry point of the ``waitlens.models`` group, so
``hooks.load_model("organism:sft-1k")`` finds it without hooks/ importing experiments/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from waitlens.traces.errors import WaitlensError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = Path(__file__).resolve().parent / "shipped.json"  # sha256 of each regime's model.safetensors
_CHECKED: set[tuple] = set()  # (path, size, mtime_ns) of weight files whose sha256 matched


class ShippedWeightsError(WaitlensError):
    """Shipped organism weights that do not match their sha256 in shipped.json."""
# sft-1k and post-large are fine-tuned from the base on `task.GO_ON_CORPUS` (train.TrainConfig)
REGIMES = ("base", "sft-1k", "post-large")


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
    verify_shipped(variant.strip(), path / "model.safetensors")
    return path


def verify_shipped(variant: str, weights: Path) -> None:
    """The weights file's sha256 equals shipped.json's (checked once per file version)."""
    try:
        expected = json.loads(SHIPPED.read_text())["sha256"].get(variant)
    except (OSError, ValueError, KeyError):
        return  # no checksums shipped (a checkout being retrained): nothing to compare with
    if expected is None or not weights.is_file():
        return
    st = weights.stat()
    key = (str(weights), st.st_size, st.st_mtime_ns)
    if key in _CHECKED:
        return
    h = hashlib.sha256()
    with weights.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    if h.hexdigest() != expected:
        raise ShippedWeightsError(
            f"{weights}: sha256 {h.hexdigest()[:16]}... does not match {expected[:16]}... in {SHIPPED} (the "
            "shipped organism weights are damaged or were changed); restore them (git checkout) or retrain "
            "with `waitlens organism train`, which rewrites shipped.json"
        )
    _CHECKED.add(key)
