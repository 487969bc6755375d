"""The model registry; importing this package registers every model family."""
from .registry import create_model, list_models, model_entry, register_model
from . import seed  # noqa: F401  (registers seed-cnn, seed-simple)

__all__ = ["create_model", "list_models", "model_entry", "register_model"]
