"""Built-in adapter methods: one file each, registered on import."""

from . import autolora, bidora, bilora, dora, dylora, lamda, lora, vera  # noqa: F401
