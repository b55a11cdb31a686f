"""Triton and torch kernels for sparse paged decode, chunk scoring and chunk copies."""
