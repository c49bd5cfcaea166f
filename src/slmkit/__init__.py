"""slmkit: run small language models (Phi-3 / Phi-3.5 first) with one API, one CLI, one server."""
from .api import LLM, GenerationChunk, GenerationResult, TokenLogprob, Usage, load
from .engine.generator import Generator, GeneratorParams
from .errors import (
    ConfigError,
    ContextLengthError,
    InvalidRequestError,
    ModelFileError,
    SlmkitError,
    UnsupportedInputError,
    UnsupportedModelError,
    WeightError,
)
from .options import GenerationOptions


def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written); a
    source tree run without installing falls back to a marker that says so."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slmkit")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()
__all__ = ["load", "LLM", "GenerationOptions", "Generator", "GeneratorParams", "GenerationResult", "GenerationChunk",
           "TokenLogprob", "Usage",
           "SlmkitError", "ModelFileError", "ConfigError", "UnsupportedModelError", "WeightError",
           "ContextLengthError", "InvalidRequestError", "UnsupportedInputError"]
