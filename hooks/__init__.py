"""hooks: the model layer — loading models, and every forward pass waitlens runs.

Locations inside a model are TransformerLens hook names (`blocks.{l}.hook_resid_post`).
"""

from hooks.answer import answer_curves, answer_probabilities, choose_prefixes
from hooks.capture import capture_residuals, residuals_at
from hooks.logprobs import token_logprobs, token_occurrences
from hooks.models import ContextLengthError, LoadedModel, ModelLoadError, load_model
from hooks.patching import PatchResult, attribute, patch
from hooks.store import ActivationStore, IncompleteStoreError, StoreError, open_store, write_store

__all__ = [
    "ActivationStore", "ContextLengthError", "IncompleteStoreError", "LoadedModel", "ModelLoadError",
    "PatchResult", "StoreError", "answer_curves", "answer_probabilities", "attribute", "capture_residuals",
    "choose_prefixes", "load_model", "open_store", "patch", "residuals_at", "token_logprobs",
    "token_occurrences", "write_store",
]
