"""Flax NNX decoder models, quantization, and attention kernels."""
