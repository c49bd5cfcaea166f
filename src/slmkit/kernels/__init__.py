"""The compiled kernels (qgemm.cpp): build, load and call, with PyTorch fallbacks."""
