"""hooks: the model layer — loading models, and every forward pass waitlens runs.

Locations inside a model are TransformerLens hook names (`blocks.{l}.hook_resid_post`).
"""

from hooks.answer import answer_curves, answer_probabilities, choose_prefixes  # noqa: F401
from hooks.capture import capture_residuals, residuals_at
from hooks.logprobs import token_logprobs, token_occurrences  # noqa: F401
from hooks.models import ContextLengthError, LoadedModel, ModelLoadError, load_model
from hooks.patching import PatchResult, attribute, patch  # noqa: F401
from hooks.store import ActivationStore, IncompleteStoreError, StoreError, open_store, write_store

__all__ = [
    "ActivationStore", "ContextLengthError", "IncompleteStoreError", "LoadedModel", "ModelLoadError",
    "StoreError", "capture_residuals", "load_model", "open_store", "residuals_at", "write_store",
]
