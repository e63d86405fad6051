"""Alignment attention: attention with an aligner slot, the head aligner, the distances (CT, GAN,
OT) and their kernels, and conversion of other models. The math layer: imports nothing above it."""
