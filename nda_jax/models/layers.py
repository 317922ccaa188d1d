"""Layers shared by every model: a 2-D convolution with fast CPU gradients.

On CPU, two things decide how fast a conv trains. First, jaxlib 0.10's XLA:CPU
runs convolutions on YNNPACK, several times slower than its own kernels on
AVX2 CPUs, its weight gradient (dW) most of all; `nda_jax.xla_cpu` turns that
off on import, after which XLA's 3x3 convs run about as fast as PyTorch's
(bench/conv_grad.py; figures in README). Second, XLA:CPU's dW is
still slow for 1x1 convs and for convs with few output channels (a generator's
RGB output). There a matmul does better. dW contracts each kernel tap's input
pixels with dy over batch and space:

  dW[i, j] = pad(x)[:, i*dh :: sh, j*dw :: sw, :].reshape(-1, Cin).T @ dy.reshape(-1, Cout)

`conv2d(..., impl="matmul")` computes that with matmuls: a `jax.custom_vjp`
whose backward pass gathers the taps (im2col) one batch chunk at a time and
contracts each chunk in one matmul (`_WEIGHT_GRADS`), while dx keeps XLA's own
transposed convolution; a 1x1 stride-1 conv is simply a matmul. `impl="xla"`
leaves everything to XLA. `impl="auto"` picks "matmul" on the CPU backend for
the shapes where bench/conv_grad.py measured it faster (`matmul_is_faster`)
and "xla" for the rest and on GPU/TPU (their convolution kernels are fast).

Differentiation: reverse mode to any order (the backward pass is itself made of
differentiable ops). Forward mode (`jax.jvp`, `jax.jacfwd`, `jax.hessian`)
raises on a `custom_vjp`, so use impl="xla" where forward mode is needed.
"""
import functools
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | int | Sequence[int | tuple[int, int]]
Pairs = tuple[tuple[int, int], tuple[int, int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_CONTRACT_ROWS = (((0,), (0,)), ((), ()))  # a.T @ b for a [M, K1], b [M, K2].
# Backends on which `impl="auto"` uses "matmul" where `matmul_is_faster`.
_MATMUL_BACKENDS = ("cpu",)
# dW strategies, chosen per shape by `weight_grad_strategy` from bench/conv_grad.py
# on a 2-core x86 CPU. Fewer output channels than this make the [KH*KW*Cin, Cout]
# matmul too thin, so dy's taps form the columns instead (stride 1 only); XLA:CPU's
# own dW is slow for those shapes too.
_THIN_FEATURES = 32
# Columns are built and contracted one batch chunk at a time, with at most this
# many bytes of columns per chunk: a chunk stays in cache, and its buffer is reused
# (one column matrix for a whole batch is well over glibc's 32 MiB mmap threshold,
# so it would be page-faulted in on every call, at ~1 GB/s here: slower than the
# matmul). 2-16 MiB measure alike for 256 channels; 2 MiB is best for 64.
_CHUNK_BYTES = 2 * 2 ** 20


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) for v in value):
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")
  return value


def _explicit_padding(padding: Padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
                      strides: tuple[int, int], dilation: tuple[int, int]) -> Pairs:
  """'SAME' / 'VALID' / int / per-side ints -> ((top, bottom), (left, right))."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID', an int or two (low, high) pairs, "
                       f"got {padding!r}.")
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
    return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, dilated, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  padding = tuple(padding)
  if len(padding) != 2:
    raise ValueError(f"padding needs one entry per spatial dim (2), got {padding!r}.")
  return tuple(_pair(p, "each padding entry") for p in padding)


def _conv_xla(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
              dilation: tuple[int, int]) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                  rhs_dilation=dilation, dimension_numbers=_DIMENSION_NUMBERS)


# --- Weight-gradient strategies: (x, dy, kernel, strides, padding, dilation) -> dW. ---
# They accumulate in at least float32; the caller casts to the kernel's dtype.

def _accumulation_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _pad_spatial(x: jax.Array, padding: Pairs) -> jax.Array:
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0),
                                             (0, 0, 0)))


def _sum_over_batch_chunks(fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                           dy: jax.Array, bytes_per_example: int,
                           out_shape: Sequence[int]) -> jax.Array:
  """sum(fn(x[c], dy[c])) over batch chunks c of at most `_CHUNK_BYTES` of columns."""
  n = x.shape[0]
  fit = _CHUNK_BYTES // bytes_per_example if bytes_per_example else n
  chunk = max(d for d in range(1, max(1, min(n, fit)) + 1) if n % d == 0)
  if chunk == n:
    return fn(x, dy)
  split = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])
  init = _vary_like_each_other(jnp.zeros(out_shape, _accumulation_dtype(x.dtype)), x)[0]
  return lax.scan(lambda acc, xy: (acc + fn(*xy), None), init, (split(x), split(dy)))[0]


def _dw_input_columns(x, dy, kernel, strides, padding, dilation):
  """im2col of x: one [KH*KW*Cin, Cout] matmul per batch chunk (the default)."""
  kh, kw, cin, cout = kernel.shape
  _, oh, ow, _ = dy.shape
  (sh, sw), (dh, dw) = strides, dilation

  def chunk_dw(x, dy):
    xp = _pad_spatial(x, padding)
    cols = jnp.concatenate([
        lax.slice(xp, (0, i * dh, j * dw, 0),
                  (x.shape[0], i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, cin),
                  (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)], axis=-1)
    return lax.dot_general(cols.reshape(-1, kh * kw * cin), dy.reshape(-1, cout),
                           _CONTRACT_ROWS, preferred_element_type=_accumulation_dtype(x.dtype))
  return _sum_over_batch_chunks(chunk_dw, x, dy, oh * ow * kh * kw * cin * x.dtype.itemsize,
                                (kh * kw * cin, cout)).reshape(kernel.shape)


def _dw_output_columns(x, dy, kernel, strides, padding, dilation):
  """im2col of dy: one [Cin, KH*KW*Cout] matmul per batch chunk, for thin Cout (stride 1).

  Tap (i, j) pairs padded-input pixel p with dy at p - (i*dh, j*dw), so each tap's
  column block is dy shifted into a zero canvas of the padded input's size, and
  the padded x is contracted whole, without per-tap copies.
  """
  kh, kw, cin, cout = kernel.shape
  (dh, dw), (ph, pw) = dilation, padding
  hp, wp = x.shape[1] + sum(ph), x.shape[2] + sum(pw)
  oh, ow = dy.shape[1:3]

  def chunk_dw(x, dy):
    zero = jnp.zeros((), dy.dtype)
    cols = jnp.concatenate([
        lax.pad(dy, zero, ((0, 0, 0), (i * dh, hp - i * dh - oh, 0), (j * dw, wp - j * dw - ow, 0),
                           (0, 0, 0)))
        for i in range(kh) for j in range(kw)], axis=-1)
    return lax.dot_general(_pad_spatial(x, padding).reshape(-1, cin),
                           cols.reshape(-1, kh * kw * cout), _CONTRACT_ROWS,
                           preferred_element_type=_accumulation_dtype(x.dtype))
  dw_t = _sum_over_batch_chunks(chunk_dw, x, dy, hp * wp * kh * kw * cout * dy.dtype.itemsize,
                                (cin, kh * kw * cout))
  return dw_t.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)


_WEIGHT_GRADS = {"input_columns": _dw_input_columns, "output_columns": _dw_output_columns}


def weight_grad_strategy(kernel_shape: Sequence[int], strides: tuple[int, int]) -> str:
  """The `_WEIGHT_GRADS` entry `impl="matmul"` uses for this shape (see the thresholds)."""
  _, _, cin, cout = kernel_shape
  if cout < _THIN_FEATURES <= cin and strides == (1, 1):
    return "output_columns"
  return "input_columns"


def matmul_is_faster(kernel_shape: Sequence[int], strides: tuple[int, int]) -> bool:
  """Whether "matmul" beat XLA:CPU (YNNPACK off) for this shape in bench/conv_grad.py.

  1x1 convs: 1.7-2.2x faster dW (fwd and dx within noise of XLA's at stride 1);
  thin Cout (a generator's RGB output): 1.9-2.3x faster dW. Other convs: XLA's
  dW is as fast or faster (1.0-2.2x for 3x3 and 7x7 incl. RGB inputs).
  """
  pointwise = tuple(kernel_shape[:2]) == (1, 1)
  return pointwise or weight_grad_strategy(kernel_shape, strides) == "output_columns"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
                 dilation: tuple[int, int]) -> jax.Array:
  return _conv_xla(x, kernel, strides, padding, dilation)


def _conv_matmul_fwd(x, kernel, strides, padding, dilation):
  return _conv_xla(x, kernel, strides, padding, dilation), (x, kernel)


def _conv_matmul_bwd(strides, padding, dilation, residuals, dy):
  x, kernel = residuals
  (dx,) = jax.linear_transpose(lambda x_: _conv_xla(x_, kernel, strides, padding, dilation), x)(dy)
  strategy = weight_grad_strategy(kernel.shape, strides)
  dkernel = _WEIGHT_GRADS[strategy](x, dy, kernel, strides, padding, dilation)
  return dx, dkernel.astype(kernel.dtype)


_conv_matmul.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)


def _vary_like_each_other(*arrays: jax.Array) -> list[jax.Array]:
  """Casts arrays to the union of their varying mesh axes (a no-op outside shard_map).

  Under shard_map a replicated kernel meets a per-device batch; lax ops insert
  this cast implicitly, but a custom_vjp must return a kernel cotangent of the
  kernel's own type, so it is made explicit (its transpose is the psum).
  """
  varying = [jax.typeof(a).mat.varying for a in arrays]
  union = frozenset().union(*varying)
  return [lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
          for a, v in zip(arrays, varying)]


def is_pointwise(kernel_shape: Sequence[int], strides: tuple[int, int], padding: Pairs) -> bool:
  """Whether the conv is a plain [N*H*W, Cin] x [Cin, Cout] matmul (1x1, stride 1, no padding)."""
  return tuple(kernel_shape[:2]) == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0))


def _conv_matmul_path(x, kernel, strides, padding, dilation):
  """impl="matmul": pointwise convs are 2-D matmuls (dW 1.7-2.8x faster than
  XLA:CPU's 1x1 conv here, fwd and dx up to 1.8x); the rest goes through the custom_vjp."""
  if is_pointwise(kernel.shape, strides, padding):
    return (x.reshape(-1, x.shape[-1]) @ kernel[0, 0]).reshape(*x.shape[:3], kernel.shape[-1])
  return _conv_matmul(*_vary_like_each_other(x, kernel), strides, padding, dilation)


_IMPLS: dict[str, Callable[..., jax.Array]] = {"xla": _conv_xla, "matmul": _conv_matmul_path}
IMPLS = ("auto", *_IMPLS)


def resolve_impl(impl: str, kernel_shape: Sequence[int], strides: tuple[int, int]) -> str:
  """'auto' -> the faster implementation for this shape on the backend being traced for."""
  if impl == "auto":
    fast = jax.default_backend() in _MATMUL_BACKENDS and matmul_is_faster(kernel_shape, strides)
    return "matmul" if fast else "xla"
  if impl not in _IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}.")
  return impl


def conv2d(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = (1, 1),
           padding: Padding = "SAME", dilation: int | Sequence[int] = (1, 1),
           impl: str = "auto") -> jax.Array:
  """NHWC x HWIO convolution; `impl` ('auto' | 'xla' | 'matmul') picks how it is computed.

  Both implementations compute the same function; "matmul" runs pointwise convs
  as matmuls and the weight gradient of the others as matmuls, "auto" uses it
  where it is faster (module docstring).
  """
  chex.assert_rank([x, kernel], 4)
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv2d: input has {x.shape[-1]} channels but the HWIO kernel "
                     f"{kernel.shape} expects {kernel.shape[2]}.")
  strides, dilation = _pair(strides, "strides"), _pair(dilation, "dilation")
  pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides, dilation)
  y = _IMPLS[resolve_impl(impl, kernel.shape, strides)](x, kernel, strides, pads, dilation)
  chex.assert_shape(y, (x.shape[0], None, None, kernel.shape[3]))
  return y


class Conv(nn.Module):
  """Drop-in for 2-D `flax.linen.Conv` (same params, init and dtype rules) using `conv2d`.

  Leading batch dims are flattened like flax's (so [B, T, H, W, C] clips work),
  and `SpectralNorm(Conv(...))` normalises 'kernel' as it does flax's Conv.
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = (1, 1)
  padding: Padding = "SAME"
  kernel_dilation: int | Sequence[int] = (1, 1)
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = _pair(self.kernel_size, "kernel_size")
    batch_shape = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:])
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, self.strides, self.padding, self.kernel_dilation, self.impl)
    if bias is not None:
      y = y + bias
    return y.reshape(batch_shape + y.shape[1:])
