"""nda_jax.trainers."""
