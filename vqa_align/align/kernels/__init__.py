"""The fast implementations of the aligners: hand-fused autograd functions (any device) and Triton
kernels (CUDA), each tested against the plain reference in align/distances/. Chosen by the
dispatch table in align/distances/__init__.py."""
