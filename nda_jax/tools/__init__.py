"""nda_jax.tools."""
