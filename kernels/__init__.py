"""Pallas GPU kernels for fp4jax's hot paths; each module sits beside the pure-JAX
reference in ``fp4jax`` that it must match bit for bit."""
