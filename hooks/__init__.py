"""hooks: the model layer — loading models, and every forward pass waitlens runs.

Locations inside a model are TransformerLens hook names (`blocks.{l}.hook_resid_post`).
"""

from hooks.models import ContextLengthError, LoadedModel, ModelLoadError, load_model

__all__ = ["ContextLengthError", "LoadedModel", "ModelLoadError", "load_model"]
