"""Building a model from files: Hugging Face folders, GGUF, packing, memory mapping."""
