"""nda_jax.importers."""
