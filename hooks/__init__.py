"""hooks: the model layer — loading models, and every forward pass waitlens runs.

Locations inside a model are TransformerLens hook names (`blocks.{l}.hook_resid_post`).
In-memory capture is `waitlens.hooks.capture.capture` (also `waitlens.capture`): bound here, the
name would shadow the submodule `waitlens.hooks.capture`.
"""

from waitlens.hooks.answer import answer_curves, answer_probabilities, choose_prefixes
from waitlens.hooks.capture import Captured, capture_residuals, residuals_at
from waitlens.hooks.logprobs import token_logprobs, token_logprobs_batch, token_occurrences
from waitlens.hooks.models import ContextLengthError, LoadedModel, ModelLoadError, load_model
from waitlens.hooks.patching import PatchResult, attribute, patch
from waitlens.hooks.store import (
    ActivationStore,
    IncompleteStoreError,
    StoreError,
    open_store,
    write_store,
)

__all__ = [
    "ActivationStore", "Captured", "ContextLengthError", "IncompleteStoreError", "LoadedModel", "ModelLoadError",
    "PatchResult", "StoreError", "answer_curves", "answer_probabilities", "attribute", "capture_residuals",
    "choose_prefixes", "load_model", "open_store", "patch", "residuals_at", "token_logprobs", "token_logprobs_batch",
    "token_occurrences", "write_store",
]
