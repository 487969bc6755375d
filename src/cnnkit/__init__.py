"""cnnkit: train, inspect and use CNN image classifiers with PyTorch.

`import cnnkit` stays light: matplotlib, captum, onnx, onnxruntime, fastapi and optuna are imported
by the first call that needs them."""
from .version import __version__  # noqa: E402,F401

from .checkpoint import LoadedModel, RunInfo, load  # noqa: E402
from .config import Config  # noqa: E402
from .recipes import RECIPES, make_config  # noqa: E402
from .data import Dataset, Split, load_dataset  # noqa: E402
from .errors import CnnkitError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402
from .report import show_batch  # noqa: E402
from .export import export  # noqa: E402
from .predict import predict  # noqa: E402
from .lrfind import lr_find  # noqa: E402
from .train import train  # noqa: E402
from .doctor import doctor  # noqa: E402
from .tune import tune  # noqa: E402

__all__ = ["Config", "RECIPES", "CnnkitError", "Dataset", "LoadedModel", "RunInfo", "Split",
           "create_model", "doctor", "evaluate", "list_models", "load", "load_dataset", "make_config",
           "export", "lr_find", "predict", "register_model", "show_batch", "train", "tune"]
