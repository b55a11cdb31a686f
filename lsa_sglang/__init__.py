"""Lookahead Sparse Attention for SGLang.

Kept import-light on purpose: a `.pth` hook imports this package in every Python
process of the CPU route, before SGLang or torch are loaded.
"""

__version__ = "0.1.0"
