"""nda_jax: Negative Data Augmentation in JAX/Flax."""
