"""Built-in adapter methods: one file each, registered on import."""

from . import dora, lora  # noqa: F401
