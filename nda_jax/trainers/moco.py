"""MoCo-v2 with NDA negatives — a method on the generic loop.

MoCo-v2 (He et al. 2020, Chen et al. 2020; facebookresearch/moco
`main_moco.py --mlp --moco-t 0.2 --aug-plus --cos`) for everything NDA does
not change: a query encoder trained by SGD, a key encoder that is its
momentum copy (updated before the keys are computed), InfoNCE against a queue
of K past keys, two aug+ views per image. `data.crops` says where the views'
RandomResizedCrops are made: 'device' (from the decoded image, in the step),
'host' (from the original photo, data/crops.py: batches of uint8
[B, 2, S, S, C]) or 'canvas' (boxes of the original photo drawn on the host,
resized in the step: `step_images`); the step does the rest of aug+.

NDA (Sinha et al. 2021, section 4): an NDA of each query's view (or of the
image, before its augmentation) is encoded by the KEY encoder in its own
forward pass with its own BN groups (so the real keys' statistics do not
change, and `nda.weight=0` is plain MoCo exactly) and enters the softmax
denominator as an extra negative: its own NDA key for each query ('own',
as augmentation-made negatives in Ge et al. 2021's MoCo code) or all NDA
keys of the global batch ('batch'), with the exponentiated logits scaled by
`nda.weight`. The NDA pass does not update the key encoder's running BN
averages: they describe real images.

Online linear probe (solo-learn's online evaluation; `online_probe.enabled`):
a linear classifier on the query encoder's pooled backbone features of the
query view, stop-gradient (the encoder's update is the same with or without
it), trained in the same step by its own optimizer (`online_probe.optim`) on
the batch's labels; `probe_top1` / `probe_loss` (train) are in every log line
and `classify_fn` (its logits on centre crops, inference-mode BN) serves a
`classification` evaluator for the test top-1.

BatchNorm: statistics over fixed-size groups of the global batch
(`model.bn_group_size`), with keys reassigned to groups that never hold their
own query (models/batch_norm.py), so the numbers do not depend on the
device count, and no key sees its query through batch statistics.
"""
import functools
from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nda_jax import images as images_lib
from nda_jax import losses
from nda_jax import optim
from nda_jax import parallel
from nda_jax.augment import negative
from nda_jax.augment import positive
from nda_jax.data import pipeline
from nda_jax.models import batch_norm
from nda_jax.models import resnet
from nda_jax.trainers import method as method_lib

PyTree = Any

NDA_SOURCES = ("query_view", "image")
MONITOR_FEATURES = ("backbone", "head")   # what embed_fn gives the kNN monitor


@flax.struct.dataclass
class MoCoState:
  step: jax.Array
  rng: jax.Array
  params: PyTree            # query encoder: {'backbone', 'head'}
  batch_stats: PyTree
  key_params: PyTree        # key encoder: momentum copy of params
  key_batch_stats: PyTree
  opt: optax.OptState
  queue: jax.Array          # [K, D] L2-normalised keys, a ring buffer
  queue_ptr: jax.Array      # where the next global batch of keys goes
  probe: PyTree = None      # online linear probe {'kernel' [F, C], 'bias' [C]}; None: off
  probe_opt: optax.OptState = None


def build_encoder(config: ml_collections.ConfigDict) -> resnet.MocoEncoder:
  m = config.model
  return resnet.build_encoder(m.arch, stem=m.stem, width=m.width, head_dim=m.head_dim,
                              mlp_head=m.mlp_head, dtype=method_lib.compute_dtype(config),
                              conv_impl=m.conv_impl)


def host_crops(config: ml_collections.ConfigDict) -> bool:
  """Whether the training crops are cut from the original photo (config.data.crops='host'
  or 'canvas'); ValueError naming the key for another value or bad config.data.views."""
  pipeline.canvas_size(config.data)
  return pipeline.view_spec(config.data) is not None


def step_images(config: ml_collections.ConfigDict) -> Callable[[dict], jax.Array]:
  """batch -> the step's float images in [-1, 1]: for crops='canvas' the views
  [B, num, S, S, C] resized on device from the canvas and its boxes, else the batch's images."""
  if pipeline.canvas_size(config.data) is None:
    return lambda batch: images_lib.to_float(batch["image"])
  size = int(config.data.views.size)
  return lambda batch: images_lib.to_float(
      images_lib.resized_crops(batch["image"], batch["boxes"], size))


def check_host_views(config: ml_collections.ConfigDict, *, num: int, size: int,
                     scale) -> None:
  """The host's views (config.data.views) are the crops the recipe asks for."""
  views = config.data.get("views")
  want = {"num": num, "size": size, "scale": tuple(scale),
          "ratio": tuple(positive.DEFAULT_RATIO)}
  got = None if views is None else {k: views.get(k) for k in want}
  if got is not None:
    got = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in got.items()}
  if got != want:
    raise ValueError(f"config.data.crops={config.data.crops!r} makes the training crops from "
                     f"config.data.views={got}, but this recipe takes {want} (aug.crop_size, "
                     f"aug.scale, torchvision's ratio): set config.data.views to match")


def probe_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the run trains an online probe (configs from before it have no section)."""
  return "online_probe" in config and bool(config.online_probe.enabled)


def probe_logits(probe: PyTree, features: jax.Array) -> jax.Array:
  """The online probe: a linear map in float32 at full precision (it is tiny)."""
  return jnp.dot(features.astype(jnp.float32), probe["kernel"],
                 precision=jax.lax.Precision.HIGHEST) + probe["bias"]


def nda_spec(nda_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The augmentation part of config.nda (name, probs, params) for the NDA registry."""
  return {k: nda_cfg[k] for k in ("name", "probs", "params")}


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MoCo's ring buffer: `keys` [n, D] replace the n oldest rows, from row `ptr`.

  Returns (queue, next ptr). K must be a multiple of n, so that a batch never
  wraps around the end (dynamic_update_slice would clamp it and overwrite the
  newest rows instead).
  """
  chex.assert_rank([queue, keys], 2)
  chex.assert_equal_shape_suffix([queue, keys], 1)
  if queue.shape[0] % keys.shape[0]:
    raise ValueError(f"a queue of {queue.shape[0]} keys cannot take batches of {keys.shape[0]}")
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
  return queue, (ptr + keys.shape[0]) % queue.shape[0]


class MoCo(method_lib.Method):
  """MoCo-v2 (+ NDA negatives). Host batches: uint8 [B, H, W, C] images."""

  def validate(self, num_devices: int) -> None:
    super().validate(num_devices)
    c = self.config
    method_lib.compute_dtype(c)
    optim.validate(c.optim.encoder, "config.optim.encoder")
    b = c.train.batch_size
    if c.moco.queue_size <= 0 or c.moco.queue_size % b:
      raise ValueError(f"config.moco.queue_size={c.moco.queue_size} must be a positive multiple "
                       f"of the global batch {b} (MoCo enqueues whole batches)")
    if not 0.0 <= c.moco.momentum < 1.0:
      raise ValueError(f"config.moco.momentum={c.moco.momentum} must be in [0, 1)")
    if c.moco.temperature <= 0:
      raise ValueError(f"config.moco.temperature={c.moco.temperature} must be > 0")
    if c.moco.monitor_features not in MONITOR_FEATURES:
      raise ValueError(f"config.moco.monitor_features={c.moco.monitor_features!r}; valid "
                       f"choices: {MONITOR_FEATURES}")
    if b % c.model.bn_group_size or b // c.model.bn_group_size < 3:
      raise ValueError(f"config.model.bn_group_size={c.model.bn_group_size} must divide the "
                       f"batch {b} into at least 3 BN groups (keys are normalised in groups "
                       f"that mix other queries' groups)")
    if c.nda.enabled:
      negative.build_nda(nda_spec(c.nda))
      if c.nda.source not in NDA_SOURCES:
        raise ValueError(f"config.nda.source={c.nda.source!r}; valid choices: {NDA_SOURCES}")
      if c.nda.scope not in losses.NDA_SCOPES_MOCO:
        raise ValueError(f"config.nda.scope={c.nda.scope!r}; valid choices: "
                         f"{losses.NDA_SCOPES_MOCO}")
      if c.nda.weight < 0:
        raise ValueError(f"config.nda.weight={c.nda.weight} must be >= 0")
      if c.nda.enqueue and c.moco.queue_size % (2 * b):
        raise ValueError(f"config.nda.enqueue=True enqueues 2 x {b} keys a step: "
                         f"config.moco.queue_size must be a multiple of {2 * b}")
    if host_crops(c):
      check_host_views(c, num=2, size=c.aug.crop_size, scale=c.aug.scale)
      if c.nda.enabled and c.nda.source == "image":
        raise ValueError("config.nda.source='image' applies the NDA to the image before its "
                         f"crop, which config.data.crops={c.data.crops!r} cuts from the "
                         "original photo: use --config.data.crops=device or "
                         "--config.nda.source=query_view")
    images_lib.normalize_input(c, jnp.zeros((1, 1, 1, c.data.channels)))
    build_encoder(c)
    if probe_enabled(c):
      optim.validate(c.online_probe.optim, "config.online_probe.optim")
      if c.data.num_classes < 2:
        raise ValueError(f"config.online_probe.enabled=True needs labelled data: "
                         f"config.data.num_classes={c.data.num_classes}")

  def optimizer(self) -> optax.GradientTransformation:
    return optim.build(self.config.optim.encoder, steps_per_epoch=self.steps_per_epoch,
                       total_steps=max(self.total_steps, 1), where="config.optim.encoder")

  def probe_optimizer(self) -> optax.GradientTransformation:
    return optim.build(self.config.online_probe.optim, steps_per_epoch=self.steps_per_epoch,
                       total_steps=max(self.total_steps, 1), where="config.online_probe.optim")

  def init_state(self, rng: jax.Array) -> MoCoState:
    c = self.config
    encoder = build_encoder(c)
    init_key, queue_key, train_key = jax.random.split(rng, 3)
    size = c.aug.crop_size
    variables = jax.jit(functools.partial(encoder.init, train=False))(
        init_key, jnp.zeros((2, size, size, c.data.channels), jnp.float32))
    params, stats = variables["params"], variables["batch_stats"]
    queue = _normalize(jax.random.normal(queue_key, (c.moco.queue_size, c.model.head_dim)))
    probe = probe_opt = None
    if probe_enabled(c):   # Zeros, as solo-learn's nn.Linear would be after any init: no key.
      features, _ = jax.eval_shape(functools.partial(encoder.apply, train=False), variables,
                                   jnp.zeros((2, size, size, c.data.channels), jnp.float32))
      probe = {"kernel": jnp.zeros((features.shape[-1], c.data.num_classes), jnp.float32),
               "bias": jnp.zeros((c.data.num_classes,), jnp.float32)}
      probe_opt = self.probe_optimizer().init(probe)
    return MoCoState(
        step=jnp.zeros((), jnp.int32), rng=train_key, params=params, batch_stats=stats,
        # Copies: the state is donated to each step, so nothing may alias.
        key_params=jax.tree.map(jnp.copy, params), key_batch_stats=jax.tree.map(jnp.copy, stats),
        opt=self.optimizer().init(params), queue=queue, queue_ptr=jnp.zeros((), jnp.int32),
        probe=probe, probe_opt=probe_opt)

  def make_step(self) -> method_lib.StepFn:
    c = self.config
    encoder = build_encoder(c)
    tx = self.optimizer()
    lr_at = optim.learning_rate_schedule(c.optim.encoder, steps_per_epoch=self.steps_per_epoch,
                                         total_steps=max(self.total_steps, 1))
    global_batch, group_size = c.train.batch_size, c.model.bn_group_size
    probe_tx = self.probe_optimizer() if probe_enabled(c) else None
    nda_fn = (negative.build_nda(nda_spec(c.nda), axis_name=parallel.AXIS)
              if c.nda.enabled else None)
    aug = functools.partial(positive.mocov2_aug, out_size=c.aug.crop_size,
                            scale=tuple(c.aug.scale), jitter=tuple(c.aug.jitter),
                            p_jitter=c.aug.p_jitter, p_gray=c.aug.p_gray,
                            blur_sigma=tuple(c.aug.blur_sigma), p_blur=c.aug.p_blur,
                            p_flip=c.aug.p_flip)
    on_host = host_crops(c)
    images_of = step_images(c)

    def views(key, images, b, crop=True):
      return aug(parallel.per_example_keys(key, b), images, crop=crop)

    def encode(params, stats, x, groups):
      (features, projection), mutated = encoder.apply(
          {"params": params, "batch_stats": stats}, images_lib.normalize_input(c, x), train=True,
          groups=groups, mutable=["batch_stats"])
      return _normalize(projection), mutated["batch_stats"], features

    def step(state: MoCoState, batch: dict) -> tuple[MoCoState, dict]:
      images = images_of(batch)
      b = images.shape[0]
      key = jax.random.fold_in(state.rng, state.step)
      if on_host:   # [b, 2, S, S, C]: the two crops of the original photo
        query_view = views(jax.random.fold_in(key, 0), images[:, 0], b, crop=False)
        key_view = views(jax.random.fold_in(key, 1), images[:, 1], b, crop=False)
      else:
        query_view = views(jax.random.fold_in(key, 0), images, b)
        key_view = views(jax.random.fold_in(key, 1), images, b)

      # The key encoder moves first (MoCo's _momentum_update_key_encoder), then encodes.
      m = c.moco.momentum
      key_params = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, state.key_params,
                                state.params)
      k, key_stats, _ = encode(key_params, state.key_batch_stats, key_view,
                               batch_norm.key_groups(jax.random.fold_in(key, 2), b, group_size,
                                                     global_batch))
      k = jax.lax.stop_gradient(k)

      nda_k = None
      if nda_fn is not None:
        nda_keys = parallel.per_example_keys(jax.random.fold_in(key, 3), b)
        if c.nda.source == "query_view":
          nda_view = nda_fn(nda_keys, query_view)
        else:   # 'image': the NDA first, then its own positive augmentation.
          nda_view = views(jax.random.fold_in(key, 4), nda_fn(nda_keys, images), b)
        # Its own BN groups; its running-average update is dropped (real images only).
        nda_k, _, _ = encode(key_params, state.key_batch_stats, nda_view,
                             batch_norm.key_groups(jax.random.fold_in(key, 5), b, group_size,
                                                   global_batch))
        nda_k = jax.lax.stop_gradient(nda_k)
        nda_for_loss = (jax.lax.all_gather(nda_k, parallel.AXIS, tiled=True)
                        if c.nda.scope == "batch" else nda_k)

      def loss_fn(params):
        q, stats, features = encode(params, state.batch_stats, query_view,
                                    batch_norm.query_groups(b, group_size, global_batch))
        if nda_k is None:
          loss, metrics = losses.moco_infonce(q, k, state.queue, None,
                                              temperature=c.moco.temperature)
        else:
          loss, metrics = losses.moco_infonce(q, k, state.queue, nda_for_loss,
                                              temperature=c.moco.temperature,
                                              nda_scope=c.nda.scope, nda_weight=c.nda.weight)
        return loss, (metrics, stats, features)

      (_, (metrics, batch_stats, features)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      grads = jax.lax.pmean(grads, parallel.AXIS)
      updates, opt = tx.update(grads, state.opt, state.params)
      params = optax.apply_updates(state.params, updates)

      probe, probe_opt = state.probe, state.probe_opt
      if probe_tx is not None:   # On the features only: no gradient reaches the encoder.
        features = jax.lax.stop_gradient(features)

        def probe_loss(p):
          logits = probe_logits(p, features)
          loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
          return loss.mean(), logits

        (metrics["probe_loss"], logits), probe_grads = jax.value_and_grad(
            probe_loss, has_aux=True)(probe)
        metrics["probe_top1"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        probe_updates, probe_opt = probe_tx.update(jax.lax.pmean(probe_grads, parallel.AXIS),
                                                   probe_opt, probe)
        probe = optax.apply_updates(probe, probe_updates)

      # Enqueue the whole global batch's keys (in global order), oldest out.
      new_keys = jax.lax.all_gather(k, parallel.AXIS, tiled=True)
      if nda_k is not None and c.nda.enqueue:
        new_keys = jnp.concatenate(
            [new_keys, jax.lax.all_gather(nda_k, parallel.AXIS, tiled=True)])
      queue, queue_ptr = enqueue(state.queue, state.queue_ptr, new_keys)

      metrics = jax.lax.pmean(metrics, parallel.AXIS)
      metrics["lr"] = lr_at(state.step)
      new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                key_params=key_params, key_batch_stats=key_stats, opt=opt,
                                queue=queue, queue_ptr=queue_ptr, probe=probe,
                                probe_opt=probe_opt)
      return new_state, metrics

    return step

  # ---------------------------------------------------------------- evaluation
  def make_eval_fns(self, dp: parallel.DataParallel) -> dict[str, Callable[..., Any]]:
    """embed_fn(state, uint8 images): the kNN monitor's features of the query encoder
    (config.moco.monitor_features) in inference mode (running BN averages), sharded
    over the mesh; with the online probe, classify_fn(state, uint8 images): its
    logits on the pooled backbone features."""
    fns = {"embed_fn": make_embedder(self.config, dp, self.config.moco.monitor_features)}
    if probe_enabled(self.config):
      embed = make_embedder(self.config)
      fns["classify_fn"] = dp.map_over_batch(
          lambda state, images: probe_logits(state.probe, embed(state, images)))
    return fns


def make_embedder(config: ml_collections.ConfigDict, dp: parallel.DataParallel | None = None,
                  features: str = "backbone") -> Callable[..., jax.Array]:
  """`embed(state_or_variables, uint8 images) -> [B, F]`: the pooled backbone features
  ('backbone') or the head's projection ('head', what MoCo's CIFAR demo monitors).

  Takes a MoCoState (query encoder) or {'params', 'batch_stats'} of a MocoEncoder.
  """
  encoder = build_encoder(config)

  def embed(state, images_u8: jax.Array) -> jax.Array:
    if isinstance(state, MoCoState):
      variables = {"params": state.params, "batch_stats": state.batch_stats}
    else:
      variables = state
    x = images_lib.normalize_input(config, images_lib.center_crop(images_lib.to_float(images_u8),
                                                                 config.aug.crop_size))
    pooled, projection = encoder.apply(variables, x, train=False)
    return pooled if features == "backbone" else projection

  return jax.jit(embed) if dp is None else dp.map_over_batch(embed)
