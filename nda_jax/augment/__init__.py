"""nda_jax.augment."""
