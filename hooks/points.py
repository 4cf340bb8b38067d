"""Residual-stream hook points on a plain HF model, named as TransformerLens names them.

`blocks.{l}.hook_resid_pre` is the input of decoder block l, `blocks.{l}.hook_resid_post`
its output (so resid_post of block l is resid_pre of block l+1, and resid_post of the last
block is *before* the final norm, unlike HF's last `hidden_states`). `residual_hooks` attaches
PyTorch hooks at those points on `LoadedModel.hf`, which keeps the model's own fast
attention; tests check the numbers against TransformerLens's `run_with_cache`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import no_type_check

from jaxtyping import Float
from torch import Tensor, nn

from waitlens.hooks.models import LoadedModel

RESID_KINDS = ("resid_pre", "resid_post")
_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post)$")

# Called with the full residual tensor at that point; return None to leave it, or a tensor of
# the same shape to replace it (activation patching).
HookFn = Callable[[Float[Tensor, "batch pos d_model"]], Tensor | None]


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (nothing after it is needed)."""


def hook_name(layer: int, kind: str = "resid_post") -> str:
    kind = normalize_kind(kind)
    return f"blocks.{layer}.hook_{kind}"


def normalize_kind(kind: str) -> str:
    k = kind.removeprefix("hook_")
    if k not in RESID_KINDS:
        raise ValueError(f"unknown residual hook {kind!r}; use one of {RESID_KINDS}")
    return k


def parse_hook_name(name: str) -> tuple[int, str]:
    """``"blocks.3.hook_resid_post"`` -> ``(3, "resid_post")``."""
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a residual hook name like 'blocks.3.hook_resid_post'")
    return int(m.group(1)), m.group(2)


def resolve_layers(layers, n_layers: int) -> list[int]:
    """``None``/``"all"`` -> every layer; ints or ``"0,3,5"`` -> those, checked and sorted."""
    if layers is None or layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"layers must be 'all' or comma-separated integers, got {layers!r}") from None
    out = sorted({int(x) for x in layers})
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad or not out:
        raise ValueError(f"layer(s) {bad or layers} out of range: the model has layers 0..{n_layers - 1}")
    return out


@contextmanager
def residual_hooks(model: LoadedModel, fns: Mapping[str, HookFn]) -> Iterator[None]:
    """Attach `fns` (hook name -> HookFn) to `model.blocks` for the duration of the block."""
    handles = []
    try:
        for name, fn in fns.items():
            layer, kind = parse_hook_name(name)
            if not 0 <= layer < model.n_layers:
                raise ValueError(f"{name}: the model has layers 0..{model.n_layers - 1}")
            block = model.blocks[layer]
            if kind == "resid_pre":
                handles.append(block.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))
            else:
                handles.append(block.register_forward_hook(_post_hook(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def _pre_hook(fn: HookFn):
    @no_type_check
    def hook(module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _post_hook(fn: HookFn):
    @no_type_check
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def decoder_of(model: LoadedModel) -> nn.Module:
    """The decoder stack (embeddings + blocks + final norm) of a loaded model, without its LM head."""
    return model.hf.base_model


def lm_head_of(model: LoadedModel) -> nn.Module:
    """The unembedding of a loaded model."""
    return model.hf.get_output_embeddings()
