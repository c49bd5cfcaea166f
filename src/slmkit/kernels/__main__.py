"""`python -m slmkit.kernels`: build the compiled kernels now (`make setup` does, at install time)."""
import sys

from .qgemm import build

try:
    print(build(verbose=True))
except RuntimeError as e:
    print(f"slmkit: the compiled kernels were not built ({e}); the PyTorch fallback will be used", file=sys.stderr)
