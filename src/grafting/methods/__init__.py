"""Built-in adapter methods: one file each, registered on import."""

from . import (adalora, autolora, bidora, bilora, dora, hydra, kasa, loldu, lora, miss, nola,  # noqa: F401
               randlora, salt, sorsa, vera)
