"""Built-in adapter methods: one file each, registered on import."""

from . import (  # noqa: F401
    adalora, autolora, bidora, bilora, dora, dylora, hydra, kasa, lamda, loldu, lora, miss, mos, nola, randlora,
    salt, soma, sorsa, vera,
)
