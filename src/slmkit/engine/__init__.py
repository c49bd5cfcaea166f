"""Inference engine: tokenizer, chat templates, model runners."""
