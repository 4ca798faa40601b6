"""Quantized weights: group-wise int8/int4 formats (formats.py), GGUF files in (gguf.py), and the
matmuls on them (kernels.py)."""
