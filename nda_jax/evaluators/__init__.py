"""nda_jax.evaluators."""
