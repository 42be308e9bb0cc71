"""Built-in adapter methods: one file each, registered on import."""

from . import autolora, bidora, bilora, dora, kasa, lora, loldu, miss, vera  # noqa: F401
