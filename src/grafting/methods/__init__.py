"""Built-in adapter methods: one file each, registered on import."""

from . import (  # noqa: F401
    adalora, autolora, bidora, bilora, dora, kasa, loldu, lora, miss, nola, randlora, salt, sorsa, vera,
)
