"""`python -m slmkit.kernels`: build the compiled kernels now (`make setup` does, at install time):
every variant this CPU runs (AVX512 and / or AVX2)."""
import sys

from .qgemm import build, cpu_variants

for which in cpu_variants() or ["avx512"]:
    try:
        print(build(verbose=True, which=which))
    except RuntimeError as e:
        print(f"slmkit: the {which} kernels were not built ({e}); the PyTorch fallback will be used",
              file=sys.stderr)
