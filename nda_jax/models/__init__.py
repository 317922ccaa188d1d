"""nda_jax.models."""
