"""nda_jax: Negative Data Augmentation in JAX/Flax."""
from nda_jax import xla_cpu

xla_cpu.keep_convolutions_off_ynnpack()
