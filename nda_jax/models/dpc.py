"""Dense Predictive Coding (DPC; Han, Xie & Zisserman, 2019) with its R2D3D encoder.

A clip of `num_seq` blocks of `seq_len` frames is encoded block by block (each
block on its own: blocks are folded into the batch, so no convolution sees two
blocks) into a `grid x grid` map of `4 * width`-d features per block. A
one-layer ConvGRU aggregates the first `num_seq - pred_step` blocks; the
prediction head (1x1 conv, ReLU, 1x1 conv) then predicts the next block's
feature map from the hidden state, and each prediction is fed back into the
ConvGRU to predict the one after, `pred_step` times. The dense contrastive loss
scores every prediction against every target feature (`losses.dpc_dense_loss`).

Kept from the reference code (TengdaHan/DPC):
- Encoder (`backbone/resnet_2d3d.py`, R18/R34): stem conv 1x7x7 stride (1, 2, 2)
  - BN - ReLU - max pool (1, 3, 3) / (1, 2, 2); basic blocks whose convs are
  1x3x3 in stages 1-2 (`width`, `2 width` channels; stage 2 strides (1, 2, 2))
  and 3x3x3 in stages 3-4 (`4 width` both: DPC narrows the last stage to 256 at
  width 64; stride 2 in time too); 1x1x1 projection + BN shortcuts where shape
  changes; no ReLU after the last block, so features are in (-inf, inf).
  Time: seq_len -> ceil(seq_len / 4) (5 -> 2); space: H -> ceil(H / 32)
  (128 -> 4). The remaining time is averaged (DPC's avg_pool3d over
  `last_duration = ceil(seq_len / 4)`, which is all of it).
- Order of nonlinearities (`dpc/model_3d.py`): targets are the pooled encoder
  features BEFORE ReLU; the ConvGRU reads ReLU(features) and ReLU(prediction).
- ConvGRU cell (`backbone/convrnn.py`): reset, update and output gates are
  convs over concat(input, state), the output gate over concat(input,
  reset * state); h' = (1 - z) h + z tanh(.). The ConvGRU wrapper applies
  dropout (p = 0.1) to the state after every step in training, also during
  the prediction roll-out; so does `DPC` (`gru_dropout`).
- Init: encoder convs Kaiming-normal (fan_out, untruncated), BN scale 1 and
  bias 0; ConvGRU and prediction-head kernels orthogonal (gain 1; PyTorch's
  `orthogonal_` on [out, in * k * k] rows = Flax's on [k * k * in, out]
  columns), their biases 0. Only the encoder has BatchNorm.

Differences, on purpose:
- BN keeps running averages (DPC pretrains with `track_running_stats=False`,
  i.e. batch statistics even in eval mode), so a frozen encoder can run in
  inference mode; statistics come from `BNGroups` groups of the global batch
  (`GroupBatchNorm`), each example's group holding all of its blocks.
- Dropout masks come from per-example keys (`dropout_keys`), so they do not
  depend on the number of devices.
- 1x3x3 convs are stored as 2-D [3, 3, in, out] kernels (`layers.Conv`, fast
  weight gradients on CPU), 3x3x3 ones as [3, 3, 3, in, out] (XLA's 3-D conv).

Clips are float `[B, T, H, W, C]` (the video NDA layout, `images.to_float`
values), T = blocks x `seq_len`.
"""
import math
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from nda_jax.models import layers
from nda_jax.models.batch_norm import BNGroups, GroupBatchNorm

Dtype = Any

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
# Per stage: channels as a multiple of `width`, spatial stride, whether the
# convs are 3x3x3 (stride also in time) rather than 1x3x3.
_STAGES = ((1, 1, False), (2, 2, False), (4, 2, True), (4, 2, True))

_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_ORTHOGONAL = nn.initializers.orthogonal()


def grid_size(image_size: int) -> int:
  """Side of the feature grid: five stride-2 steps, each ceil(n / 2)."""
  return math.ceil(image_size / 32)


def _clip_norm(bn: GroupBatchNorm, x: jax.Array, train: bool,
               groups: BNGroups | None) -> jax.Array:
  """`bn` of [B, blocks, t, h, w, c] activations with one group id per clip.

  All blocks of a clip share its BN group (DPC normalises the folded batch of
  blocks), so the blocks are merged into the time axis for the 5-D BN.
  """
  b, n, t, *rest = x.shape
  y = bn(x.reshape(b, n * t, *rest), use_running_average=not train, groups=groups)
  return y.reshape(x.shape)


class _BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN plus shortcut, then ReLU unless `final_relu` is off."""
  features: int
  stride: int
  is_3d: bool
  final_relu: bool
  bn_momentum: float
  bn_epsilon: float
  dtype: Dtype
  conv_impl: str

  def _conv(self, x: jax.Array, kernel: int, stride: int, name: str) -> jax.Array:
    if self.is_3d:
      conv = nn.Conv(self.features, (kernel,) * 3, strides=(stride,) * 3,
                     padding=((kernel // 2, kernel // 2),) * 3, use_bias=False,
                     kernel_init=_KAIMING_FAN_OUT, dtype=self.dtype, name=name)
    else:
      conv = layers.Conv(self.features, kernel, strides=stride, padding=kernel // 2,
                         use_bias=False, kernel_init=_KAIMING_FAN_OUT, dtype=self.dtype,
                         impl=self.conv_impl, name=name)
    return conv(x)

  def _norm(self, x: jax.Array, name: str, train: bool, groups: BNGroups | None) -> jax.Array:
    bn = GroupBatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
                        name=name)
    return _clip_norm(bn, x, train, groups)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, groups: BNGroups | None) -> jax.Array:
    y = self._conv(x, 3, self.stride, "conv1")
    y = nn.relu(self._norm(y, "bn1", train, groups))
    y = self._conv(y, 3, 1, "conv2")
    y = self._norm(y, "bn2", train, groups)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = self._norm(self._conv(x, 1, self.stride, "proj_conv"), "proj_bn", train, groups)
    y = y + x
    return nn.relu(y) if self.final_relu else y


class R2D3D(nn.Module):
  """DPC's ResNet-2D3D: [B, blocks, seq_len, H, W, 3] -> [B, blocks, t', g, g, 4 width].

  Every block is encoded on its own; t' = ceil(seq_len / 4), g = ceil(H / 32).
  The output has no final ReLU.
  """
  stage_sizes: Sequence[int] = STAGE_SIZES[18]
  width: int = 64
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, blocks: jax.Array, *, train: bool,
               groups: BNGroups | None) -> jax.Array:
    chex.assert_rank(blocks, 6)
    b, n = blocks.shape[:2]
    x = layers.Conv(self.width, 7, strides=2, padding=3, use_bias=False,
                    kernel_init=_KAIMING_FAN_OUT, dtype=self.dtype, impl=self.conv_impl,
                    name="stem_conv")(blocks)
    stem_bn = GroupBatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, name="stem_bn")
    x = nn.relu(_clip_norm(stem_bn, x, train, groups))
    frames = x.reshape(-1, *x.shape[-3:])
    frames = nn.max_pool(frames, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = frames.reshape(b, n, -1, *frames.shape[-3:])
    for stage, (size, (mult, stride, is_3d)) in enumerate(zip(self.stage_sizes, _STAGES)):
      for i in range(size):
        last = stage == len(self.stage_sizes) - 1 and i == size - 1
        x = _BasicBlock(self.width * mult, stride if i == 0 else 1, is_3d, not last,
                        self.bn_momentum, self.bn_epsilon, self.dtype, self.conv_impl,
                        name=f"layer{stage + 1}_block{i}")(x, train=train, groups=groups)
    chex.assert_shape(x, (b, n, math.ceil(blocks.shape[2] / 4), grid_size(blocks.shape[3]),
                          grid_size(blocks.shape[4]), self.width * 4))
    return x


class ConvGRUCell(nn.Module):
  """DPC's ConvGRU cell: (input [B, h, w, C], state [B, h, w, F]) -> new state."""
  features: int
  kernel_size: int = 1
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, state: jax.Array) -> jax.Array:
    if self.kernel_size % 2 != 1:
      raise ValueError(f"ConvGRUCell: kernel_size must be odd (size-preserving), "
                       f"got {self.kernel_size}")
    chex.assert_rank([x, state], 4)
    chex.assert_shape(state, (*x.shape[:3], self.features))

    def gate(name: str, inputs: jax.Array) -> jax.Array:
      return layers.Conv(self.features, self.kernel_size, padding=self.kernel_size // 2,
                         kernel_init=_ORTHOGONAL, dtype=self.dtype, impl=self.conv_impl,
                         name=name)(inputs)

    combined = jnp.concatenate([x, state], axis=-1)
    update = nn.sigmoid(gate("update_gate", combined))
    reset = nn.sigmoid(gate("reset_gate", combined))
    out = jnp.tanh(gate("out_gate", jnp.concatenate([x, state * reset], axis=-1)))
    return state * (1 - update) + out * update


class DPC(nn.Module):
  """R2D3D encoder + ConvGRU aggregator + prediction head, as DPC-RNN.

  Defaults are DPC's: R18, 256-d features, 128 px clips of 8 blocks x 5 frames,
  predicting the last 3 blocks from the first 5. `__call__` returns
  (pred, target, context): pred and target [B, pred_step, grid * grid, D]
  (positions row-major), context [B, D] the spatially pooled ConvGRU state
  after the observed blocks. BN runs in training mode when `train`; apply with
  mutable=['batch_stats'] then, and pass per-example `dropout_keys` [B] when
  `gru_dropout > 0` (e.g. `parallel.per_example_keys`). Probes and NDA
  negatives use `encode` / `context` (`apply(..., method=DPC.encode)`).
  """
  depth: int = 18
  width: int = 64
  num_seq: int = 8
  seq_len: int = 5
  pred_step: int = 3
  gru_kernel: int = 1
  gru_dropout: float = 0.1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @property
  def feature_dim(self) -> int:
    return 4 * self.width

  def setup(self):
    if self.depth not in STAGE_SIZES:
      raise ValueError(f"DPC: depth={self.depth}; valid choices: {sorted(STAGE_SIZES)}")
    if not 0 < self.pred_step < self.num_seq:
      raise ValueError(f"DPC: need 0 < pred_step < num_seq, got pred_step={self.pred_step}, "
                       f"num_seq={self.num_seq}")
    self.encoder = R2D3D(STAGE_SIZES[self.depth], self.width, self.bn_momentum,
                         self.bn_epsilon, self.dtype, self.conv_impl)
    self.agg = ConvGRUCell(self.feature_dim, self.gru_kernel, self.dtype, self.conv_impl)
    pointwise = lambda: layers.Conv(self.feature_dim, 1, kernel_init=_ORTHOGONAL,
                                    dtype=self.dtype, impl=self.conv_impl)
    self.pred_hidden = pointwise()
    self.pred_out = pointwise()

  def encode(self, clips: jax.Array, *, train: bool = False,
             groups: BNGroups | None = None) -> jax.Array:
    """[B, blocks * seq_len, H, W, C] -> pre-ReLU block features [B, blocks, g, g, D]."""
    chex.assert_rank(clips, 5)
    b, t = clips.shape[:2]
    if t % self.seq_len:
      raise ValueError(f"DPC.encode: {t} frames are not whole blocks of seq_len={self.seq_len}")
    blocks = clips.reshape(b, t // self.seq_len, self.seq_len, *clips.shape[2:])
    return self.encoder(blocks, train=train, groups=groups).mean(axis=2)

  def predict(self, state: jax.Array) -> jax.Array:
    """The prediction head: the next block's features from the ConvGRU state."""
    return self.pred_out(nn.relu(self.pred_hidden(state)))

  def _step(self, x: jax.Array, state: jax.Array, step: int, train: bool,
            dropout_keys: jax.Array | None) -> jax.Array:
    """One ConvGRU step on ReLU'd features, then DPC's dropout of the state."""
    state = self.agg(x, state)
    if not train or self.gru_dropout == 0:
      return state
    if dropout_keys is None:
      raise ValueError("DPC: training with gru_dropout > 0 needs per-example dropout_keys")
    keep = 1.0 - self.gru_dropout
    mask = jax.vmap(lambda key: jax.random.bernoulli(
        jax.random.fold_in(key, step), keep, state.shape[1:]))(dropout_keys)
    return jnp.where(mask, state / keep, 0).astype(state.dtype)

  def _aggregate(self, features: jax.Array, train: bool,
                 dropout_keys: jax.Array | None) -> jax.Array:
    """ConvGRU over ReLU(features) [B, n, g, g, D] from a zero state -> final state."""
    state = jnp.zeros(features.shape[:1] + features.shape[2:], features.dtype)
    for step in range(features.shape[1]):
      state = self._step(nn.relu(features[:, step]), state, step, train, dropout_keys)
    return state

  def context(self, clips: jax.Array, *, train: bool = False, groups: BNGroups | None = None,
              dropout_keys: jax.Array | None = None) -> jax.Array:
    """Probe features [B, D]: the ConvGRU state after all blocks of the clip, pooled.

    DPC's linear-probe model applies ReLU before the temporal pooling; this
    keeps the pretraining order (pool, then ReLU) that the ConvGRU learned on.
    """
    state = self._aggregate(self.encode(clips, train=train, groups=groups), train, dropout_keys)
    return state.mean(axis=(1, 2))

  def __call__(self, clips: jax.Array, *, train: bool, groups: BNGroups | None = None,
               dropout_keys: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    chex.assert_shape(clips, (None, self.num_seq * self.seq_len, None, None, None))
    features = self.encode(clips, train=train, groups=groups)
    b, n, gh, gw, d = features.shape
    observed = n - self.pred_step
    state = self._aggregate(features[:, :observed], train, dropout_keys)
    context = state.mean(axis=(1, 2))
    preds = []
    for i in range(self.pred_step):
      preds.append(self.predict(state))
      if i + 1 < self.pred_step:  # the last state would predict past the clip
        state = self._step(nn.relu(preds[-1]), state, observed + i, train, dropout_keys)
    pred = jnp.stack(preds, axis=1).reshape(b, self.pred_step, gh * gw, d)
    target = features[:, observed:].reshape(b, self.pred_step, gh * gw, d)
    return pred, target, context
