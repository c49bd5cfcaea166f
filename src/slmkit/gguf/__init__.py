"""GGUF model files: a validating, memory-mapped reader and vectorised torch dequantisation."""
from slmkit.gguf.quants import GGML_QUANT_SIZES, GGML_TYPE_NAMES, SUPPORTED_TYPES, dequantize
from slmkit.gguf.reader import GGUFError, GGUFFile, TensorInfo, open_gguf

__all__ = [
    "GGUFError",
    "GGUFFile",
    "TensorInfo",
    "open_gguf",
    "dequantize",
    "SUPPORTED_TYPES",
    "GGML_TYPE_NAMES",
    "GGML_QUANT_SIZES",
]
