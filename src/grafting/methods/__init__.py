"""Built-in adapter methods: one file each, registered on import."""

from . import (  # noqa: F401
    adalora, autolora, bidora, bilora, dora, dylora, kasa, lamda, loldu, lora, miss, nola, randlora, salt, soma,
    sorsa, vera,
)
