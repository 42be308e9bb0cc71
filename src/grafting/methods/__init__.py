"""Built-in adapter methods: one file each, registered on import."""

from . import autolora, bidora, bilora, dora, lora, nola, randlora, vera  # noqa: F401
