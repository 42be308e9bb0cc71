"""grafting: adapt pretrained models cheaply.

    import grafting as gf
    model = gf.adapt(base, gf.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model.save_adapter("out/adapter")          # PEFT format
"""

from .config import LoraConfig
from .errors import GraftingError
from .model import AdaptedModel, adapt, load
from .registry import get_method, method_names, register

__version__ = "0.1.0"

__all__ = ["AdaptedModel", "GraftingError", "LoraConfig", "adapt", "get_method", "load", "method_names",
           "register", "__version__"]
