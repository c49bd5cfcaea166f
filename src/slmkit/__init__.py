"""slmkit: run small language models (Phi-3 / Phi-3.5 first) with one API, one CLI, one server."""
from .api import LLM, GenerationChunk, GenerationResult, TokenLogprob, Usage, load
from .engine.generator import Generator, GeneratorParams
from .options import GenerationOptions
from .errors import (ConfigError, ContextLengthError, InvalidRequestError, ModelFileError, SlmkitError,
                     UnsupportedInputError, UnsupportedModelError, WeightError)

__version__ = "0.1.0"
__all__ = ["load", "LLM", "GenerationOptions", "Generator", "GeneratorParams", "GenerationResult", "GenerationChunk", "TokenLogprob", "Usage",
           "SlmkitError", "ModelFileError", "ConfigError", "UnsupportedModelError", "WeightError",
           "ContextLengthError", "InvalidRequestError", "UnsupportedInputError"]
