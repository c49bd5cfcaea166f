"""Where models come from: the built-in model, the Ollama store, the Hugging Face hub."""
