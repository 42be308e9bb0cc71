"""grafting: adapt pretrained models cheaply.

    import grafting as gf
    model = gf.adapt(base, gf.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model.save_adapter("out/adapter")          # PEFT format

Every registered method's config is reachable as ``gf.<ConfigName>`` (``gf.DoraConfig``, or a plug-in's).
"""

from .config import AdapterConfig
from .errors import GraftingError
from .io.reader import AdapterReader
from .methods.base import Method
from .methods.dora import DoraConfig
from .methods.lora import LoraConfig
from .model import AdaptedModel, adapt, load
from .registry import get_method, method_names, register

__version__ = "0.1.0"

__all__ = ["AdaptedModel", "AdapterConfig", "AdapterReader", "DoraConfig", "GraftingError", "LoraConfig", "Method",
           "adapt", "get_method", "load", "method_names", "register", "__version__"]


def __getattr__(name: str):
    from .registry import config_class_named
    cls = config_class_named(name)
    if cls is None:
        raise AttributeError(f"module 'grafting' has no attribute '{name}'")
    return cls
