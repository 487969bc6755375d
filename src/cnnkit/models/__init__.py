"""The model registry; importing this package registers every model family."""
from .registry import create_model, is_zoo_name, list_models, model_entry, register_model
from . import fastnet, resnet, seed  # noqa: F401  (each module registers its models)

__all__ = ["create_model", "is_zoo_name", "list_models", "model_entry", "register_model"]
