"""Built-in adapter methods: one file each, registered on import."""

from . import (adalora, autolora, bidora, bilora, dora, hydra, kasa, loldu, lora, miss, mos,  # noqa: F401
               nola, randlora, salt, sorsa, vera)
