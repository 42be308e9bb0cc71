"""Built-in adapter methods: one file each, registered on import."""

from . import autolora, bidora, bilora, dora, dylora, lamda, lora, soma, vera  # noqa: F401
