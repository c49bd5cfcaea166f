"""The HTTP server (`slm serve`): OpenAI- and Ollama-compatible routes (server/app.py)."""
