"""Dense Predictive Coding (DPC) with NDA negatives — a method on the generic loop.

DPC (Han, Xie & Zisserman 2019; TengdaHan/DPC `dpc/main.py`): a clip of
`num_seq` blocks of `seq_len` frames is encoded block by block; a ConvGRU
reads the first `num_seq - pred_step` blocks and predicts the feature maps of
the last `pred_step` blocks (models/dpc.py). Every predicted feature (future
step, grid position) is scored against the true features of the future blocks
of all candidate clips (`losses.dpc_dense_loss`): the positive is the same
clip, step and position, everything else is a negative. Adam (lr 1e-3, weight
decay 1e-5, torch's coupled form); DPC's UCF-101 augmentation on device
(`positive.dpc_aug_video`).

Candidates: DPC scored each GPU's predictions against that GPU's clips, so
its negatives depended on the GPU count. Here they are the clips of a fixed
group of the global batch (`dpc.candidate_group_size`, consecutive clips;
0 = the whole global batch), the same on any number of devices: a group
within a device's shard is scored locally, a group spread over devices is
all-gathered. Negatives are other clips' targets computed by the same
network and carry gradient, as in DPC (its loss backpropagates through every
candidate); the gradient of a gathered target flows back to the device that
computed it (all_gather's transpose).

NDA negatives (Sinha et al. 2021): each augmented clip's future blocks go
through a video NDA (augment/video.py) made at the frame level, so that no
NDA block is a real block; the encoder (same parameters, train-mode BN with
the real clips' group assignment but its own statistics, running averages
left to the real clips) turns them into features that enter the denominator
of the corresponding predictions as extra negatives: with `nda.scope`
'same_position' (default) the NDA feature at the prediction's own step and
position — the hardest NDA negative, the same content with its structure
broken, one per prediction as MoCo's 'own' NDA key — or 'all' (every NDA
feature of the clip). NDA features carry gradient like DPC's other
negatives. The NDA is applied after the positive augmentation, so an NDA
block differs from its real block by the NDA alone (same crop, flip and
colours) and cannot be told apart by augmentation statistics.
`nda.enabled=False` is plain DPC.

Default NDA: 'spatial_jigsaw+block_frame_shuffle', each NDA clip one or the
other with probability 1/2: a spatial and a temporal NDA, both far outside
the data (a jigsawed scene; frames out of order within a block), the two
kinds of structure a predicted block must respect. Frame reversal within a
block (`block_reverse`) is often physically plausible motion, so it is
available but not in the default. NDAs that keep real blocks
(`temporal_shuffle` reorders whole blocks, `clip_stitch` cuts between
blocks) are rejected: their blocks would duplicate positives.

BatchNorm: statistics over fixed groups of the global batch
(`model.bn_group_size`, DPC's per-GPU batch), device-count independent, with
running averages kept so a frozen encoder can be probed in inference mode.
"""
import inspect
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nda_jax import images as images_lib
from nda_jax import losses
from nda_jax import optim
from nda_jax import parallel
from nda_jax.augment import positive
from nda_jax.augment import video
from nda_jax.models import batch_norm
from nda_jax.models import dpc as dpc_model
from nda_jax.trainers import method as method_lib

PyTree = Any

# Video NDAs none of whose blocks is a real block (augment/video.py).
NDAS = ("spatial_jigsaw", "frame_jigsaw", "block_frame_shuffle", "block_reverse",
        "temporal_reverse")


@flax.struct.dataclass
class DPCState:
  step: jax.Array
  rng: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt: optax.OptState


def build_model(config: ml_collections.ConfigDict) -> dpc_model.DPC:
  m = config.model
  return dpc_model.DPC(depth=m.depth, width=m.width, num_seq=m.num_seq, seq_len=m.seq_len,
                       pred_step=m.pred_step, gru_kernel=m.gru_kernel,
                       gru_dropout=m.gru_dropout, dtype=method_lib.compute_dtype(config),
                       conv_impl=m.conv_impl)


def nda_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.nda's augmentation part for `video.build_video_nda`, block lengths = model.seq_len.

  Raises ValueError for an NDA that keeps real blocks or a block_len other than seq_len.
  """
  names = [n.strip() for n in config.nda.name.split("+")]
  bad = [n for n in names if n not in NDAS]
  if bad:
    raise ValueError(f"config.nda.name={config.nda.name!r}: {bad} cannot serve as DPC negatives "
                     f"(some of their blocks are real blocks, or they are unknown); valid "
                     f"choices, joined with '+': {NDAS}")
  params = {k: dict(v) for k, v in config.nda.params.items()}
  for name in names:
    if "block_len" in inspect.signature(video.VIDEO_NDAS[name]).parameters:
      given = params.setdefault(name, {}).setdefault("block_len", config.model.seq_len)
      if given != config.model.seq_len:
        raise ValueError(f"config.nda.params.{name}.block_len={given} must be "
                         f"config.model.seq_len={config.model.seq_len} (or left out)")
  return {"name": config.nda.name, "probs": config.nda.probs, "params": params}


def observed_frames(config: ml_collections.ConfigDict) -> int:
  """Frames of the blocks the ConvGRU reads; the rest are the predicted (future) blocks."""
  m = config.model
  return (m.num_seq - m.pred_step) * m.seq_len


def check_clips(config: ml_collections.ConfigDict) -> None:
  """ValueError unless a clip is the model's blocks (data.num_frames = model.num_seq x
  model.seq_len) and the crop fits its frames; the video classifier's clips are the same."""
  c = config
  frames = c.model.num_seq * c.model.seq_len
  if c.data.get("num_frames") != frames:
    raise ValueError(f"config.data.num_frames={c.data.get('num_frames')} must be "
                     f"model.num_seq x model.seq_len = {frames}")
  side = min(c.data.image_size, c.data.get("frame_width") or c.data.image_size)
  if not 0 < c.aug.crop_size <= side:
    raise ValueError(f"config.aug.crop_size={c.aug.crop_size} must be in [1, {side}], the "
                     f"frames' shorter side (config.data.image_size, config.data.frame_width)")


def augment(config: ml_collections.ConfigDict, keys: jax.Array, clips: jax.Array) -> jax.Array:
  """Training views of float [-1, 1] clips, one key per clip."""
  a = config.aug
  return positive.dpc_aug_video(keys, clips, a.out_size, crop_size=a.crop_size,
                                jitter=tuple(a.jitter), p_gray=a.p_gray, p_flip=a.p_flip)


def center_view(config: ml_collections.ConfigDict, clips: jax.Array) -> jax.Array:
  """The evaluation view: the central crop_size square of each frame, resized to out_size."""
  h, w = clips.shape[2:4]
  size = config.aug.crop_size
  if h < size or w < size:
    raise ValueError(f"frames of {h}x{w} are smaller than config.aug.crop_size={size}")
  top, left = (h - size) // 2, (w - size) // 2
  crop = clips[:, :, top:top + size, left:left + size].astype(jnp.float32)
  out = config.aug.out_size
  return jax.image.resize(crop, (*crop.shape[:2], out, out, crop.shape[-1]), "linear",
                          antialias=True)


def make_nda_fn(config: ml_collections.ConfigDict, axis_name: str | None = parallel.AXIS
                ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`fn(keys, clips) -> NDA of the future blocks [b, pred_step * seq_len, H, W, C]`.

  Only the future blocks are made and encoded: they are the only NDA features
  the loss reads. `keys`: one per clip (global-index keys inside a step).
  """
  nda = video.build_video_nda(nda_spec(config), axis_name=axis_name)
  start = observed_frames(config)
  return lambda keys, clips: nda(keys, clips[:, start:])


def dense_loss(config: ml_collections.ConfigDict, pred: jax.Array, target: jax.Array,
               nda: jax.Array | None, global_batch: int
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`losses.dpc_dense_loss` of this device's clips against their candidate group.

  Inside a per-device step. A group larger than the shard is gathered over the
  mesh and sliced; groups within the shard are scored each on its own.
  """
  b = pred.shape[0]
  size = config.dpc.candidate_group_size or global_batch
  kwargs = {} if nda is None else {"nda_scope": config.nda.scope,
                                   "nda_weight": config.nda.weight}
  if size > b:
    everyone = jax.lax.all_gather(target, parallel.AXIS, tiled=True)
    index = parallel.example_index(b)
    start = index[0] // size * size
    candidates = jax.lax.dynamic_slice_in_dim(everyone, start, size)
    return losses.dpc_dense_loss(pred, candidates, nda=nda, query_index=index - start, **kwargs)
  groups = lambda x: None if x is None else x.reshape(b // size, size, *x.shape[1:])
  loss, metrics = jax.vmap(lambda p, t, a: losses.dpc_dense_loss(p, t, nda=a, **kwargs))(
      groups(pred), groups(target), groups(nda))
  return loss.mean(), jax.tree.map(jnp.mean, metrics)


class DPC(method_lib.Method):
  """DPC (+ NDA negatives). Host batches: uint8 clips [B, num_seq * seq_len, H, W, C]."""

  def validate(self, num_devices: int) -> None:
    super().validate(num_devices)
    c = self.config
    method_lib.compute_dtype(c)
    optim.validate(c.optim.encoder, "config.optim.encoder")
    b, local = c.train.batch_size, c.train.batch_size // num_devices
    if b % c.model.bn_group_size:
      raise ValueError(f"config.model.bn_group_size={c.model.bn_group_size} must divide the "
                       f"batch {b}")
    size = c.dpc.candidate_group_size or b
    if size < 1 or b % size or (size % local and local % size):
      raise ValueError(f"config.dpc.candidate_group_size={c.dpc.candidate_group_size} must be 0 "
                       f"(the global batch) or divide the batch {b}, and divide or be a multiple "
                       f"of the {local} clips per device")
    check_clips(c)
    if c.nda.enabled:
      video.build_video_nda(nda_spec(c))
      if c.nda.scope not in losses.NDA_SCOPES_DPC:
        raise ValueError(f"config.nda.scope={c.nda.scope!r}; valid choices: "
                         f"{losses.NDA_SCOPES_DPC}")
      if c.nda.weight < 0:
        raise ValueError(f"config.nda.weight={c.nda.weight} must be >= 0")
    images_lib.normalize_input(c, jnp.zeros((1, 1, 1, c.data.channels)))
    jax.eval_shape(self._init_variables, jax.random.key(0, impl="unsafe_rbg"))  # model errors

  def optimizer(self) -> optax.GradientTransformation:
    return optim.build(self.config.optim.encoder, steps_per_epoch=self.steps_per_epoch,
                       total_steps=max(self.total_steps, 1), where="config.optim.encoder")

  def _init_variables(self, key: jax.Array) -> PyTree:
    c = self.config
    clips = jnp.zeros((1, c.model.num_seq * c.model.seq_len, c.aug.out_size, c.aug.out_size,
                       c.data.channels), jnp.float32)
    return build_model(c).init(key, clips, train=False)

  def init_state(self, rng: jax.Array) -> DPCState:
    init_key, train_key = jax.random.split(rng)
    # XLA:CPU compiles one threefry RNG per variable slowly (70 s for the demo model,
    # 14 s with RngBitGenerator): the initial weights come from an 'unsafe_rbg' key.
    rbg_key = jax.random.wrap_key_data(jax.random.bits(init_key, (4,), jnp.uint32),
                                       impl="unsafe_rbg")
    variables = jax.jit(self._init_variables)(rbg_key)
    params = variables["params"]
    return DPCState(step=jnp.zeros((), jnp.int32), rng=train_key, params=params,
                    batch_stats=variables["batch_stats"], opt=self.optimizer().init(params))

  def step_batch(self, host_batch: method_lib.Batch) -> method_lib.Batch:
    return {"image": host_batch["image"]}

  def make_step(self) -> method_lib.StepFn:
    c = self.config
    model = build_model(c)
    tx = self.optimizer()
    lr_at = optim.learning_rate_schedule(c.optim.encoder, steps_per_epoch=self.steps_per_epoch,
                                         total_steps=max(self.total_steps, 1))
    global_batch = c.train.batch_size
    nda_fn = make_nda_fn(c) if c.nda.enabled else None
    steps, positions = c.model.pred_step, dpc_model.grid_size(c.aug.out_size) ** 2

    def step(state: DPCState, batch: dict) -> tuple[DPCState, dict]:
      b = batch["image"].shape[0]
      key = jax.random.fold_in(state.rng, state.step)
      keys = lambda salt: parallel.per_example_keys(jax.random.fold_in(key, salt), b)
      clips = augment(c, keys(0), images_lib.to_float(batch["image"]))
      groups = batch_norm.query_groups(b, c.model.bn_group_size, global_batch)
      nda_clips = None if nda_fn is None else images_lib.normalize_input(c, nda_fn(keys(2), clips))
      clips = images_lib.normalize_input(c, clips)

      def loss_fn(params):
        (pred, target, _), mutated = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, clips, train=True,
            groups=groups, dropout_keys=keys(1), mutable=["batch_stats"])
        nda = None
        if nda_clips is not None:   # Its own BN statistics; the running averages are dropped.
          features, _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                                    nda_clips, train=True, groups=groups,
                                    mutable=["batch_stats"], method=dpc_model.DPC.encode)
          nda = features.reshape(b, steps, positions, -1)
        loss, metrics = dense_loss(c, pred, target, nda, global_batch)
        return loss, (metrics, mutated["batch_stats"])

      (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params)
      grads = jax.lax.pmean(grads, parallel.AXIS)
      updates, opt = tx.update(grads, state.opt, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = jax.lax.pmean(metrics, parallel.AXIS)
      metrics["lr"] = lr_at(state.step)
      return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt=opt), metrics

    return step

  # ---------------------------------------------------------------- evaluation
  def make_eval_fns(self, dp: parallel.DataParallel) -> dict[str, Callable[..., Any]]:
    """embed_fn(state, uint8 clips [B, T, H, W, C]) -> [B, D]: the ConvGRU state after all
    blocks, pooled (`DPC.context`), in inference mode on the central view."""
    return {"embed_fn": make_embedder(self.config, dp)}


def make_embedder(config: ml_collections.ConfigDict,
                  dp: parallel.DataParallel | None = None) -> Callable[..., jax.Array]:
  """`embed(state_or_variables, uint8 clips) -> [B, D]` context features (T: whole blocks)."""
  model = build_model(config)

  def embed(state, clips_u8: jax.Array) -> jax.Array:
    if isinstance(state, DPCState):
      variables = {"params": state.params, "batch_stats": state.batch_stats}
    else:
      variables = state
    x = images_lib.normalize_input(config, center_view(config, images_lib.to_float(clips_u8)))
    return model.apply(variables, x, method=dpc_model.DPC.context)

  return jax.jit(embed) if dp is None else dp.map_over_batch(embed)
