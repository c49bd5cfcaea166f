"""Text in and out: tokenizers (Hugging Face and GGUF), chat templates, stop strings."""
