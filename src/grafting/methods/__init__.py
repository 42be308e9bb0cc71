"""Built-in adapter methods: one file each, registered on import."""

from . import adalora, autolora, bidora, bilora, dora, lora, vera  # noqa: F401
