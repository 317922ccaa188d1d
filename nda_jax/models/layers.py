"""Layers shared by every model. PLACEHOLDER: issue 5 replaces conv2d's CPU weight gradient."""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def conv2d(x, kernel, strides=(1, 1), padding="SAME", dilation=(1, 1), impl="auto"):
  """NHWC x HWIO convolution. `impl` picks how gradients are computed (see issue 5)."""
  del impl
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
  """Drop-in for `flax.linen.Conv` (same param names and init) using `conv2d`."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  kernel_dilation: Sequence[int] = (1, 1)
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    y = conv2d(x.astype(dtype), kernel.astype(dtype), tuple(self.strides), self.padding,
               tuple(self.kernel_dilation), self.impl)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y
