"""Reading and writing adapters: PEFT's on-disk format, safetensors only, atomic writes."""
