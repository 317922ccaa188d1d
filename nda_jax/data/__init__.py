"""nda_jax.data."""
