"""Attention kernels (Pallas, TPU and GPU) and the pure-jnp reference they are tested against."""
