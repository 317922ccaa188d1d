"""NDA-GAN: BigGAN whose discriminator also sees NDA(real) as fakes — a method on the loop.

One step (as the official `train_fns_aug.GAN_training_function`):
`num_d_steps` D updates, each on a new real batch with its own NDA batch made on
device from that real batch, then one G update, then the EMA of G. It is written
as a per-device function: gradients and G's BN statistics are averaged over the
mesh axis `data`, and per-sample randomness (z, fake labels, NDA draws) is folded
from the global example index, so the numbers do not depend on the device count.
"""
import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nda_jax import images as images_lib
from nda_jax import losses
from nda_jax import optim
from nda_jax import parallel
from nda_jax import visualize
from nda_jax import workdir as workdir_lib
from nda_jax.augment import negative
from nda_jax.models import biggan
from nda_jax.trainers import method as method_lib

PyTree = Any


@flax.struct.dataclass
class GANState:
  """Everything one iteration reads and writes; a checkpoint is this pytree."""
  step: jax.Array            # completed iterations (G updates)
  rng: jax.Array             # raw uint32[2] key; per-iteration keys are folded from it
  g_params: PyTree
  g_stats: PyTree            # BN running statistics and SN power-iteration vectors
  d_params: PyTree
  d_stats: PyTree
  g_opt: optax.OptState
  d_opt: optax.OptState
  ema_params: PyTree         # EMA of G, incl. its statistics (as BigGAN-PyTorch's ema)
  ema_stats: PyTree


# ------------------------------------------------------------------ models
def num_classes(config: ml_collections.ConfigDict) -> int:
  """Unconditional models use one class with every label 0 (as the official C10U)."""
  return int(config.data.num_classes) if config.model.conditional else 1


def build_models(config: ml_collections.ConfigDict, axis_name: str | None = parallel.AXIS):
  """(G, D) as configured; G's BN averages statistics over `axis_name` when set."""
  m = config.model
  if m.sample_bn not in ("batch", "running"):
    raise ValueError(f"config.model.sample_bn={m.sample_bn!r}; valid choices: ('batch', 'running')")
  common_kw = dict(ch=m.ch, resolution=config.data.image_size, n_classes=num_classes(config),
                   conv_impl=m.conv_impl, dtype=method_lib.compute_dtype(config))
  generator = biggan.Generator(dim_z=m.dim_z, axis_name=axis_name, out_channels=config.data.channels,
                               sample_with_batch_stats=m.sample_bn == "batch", **common_kw)
  discriminator = biggan.Discriminator(in_channels=config.data.channels, **common_kw)
  return generator, discriminator


def _normal(keys: jax.Array, dim: int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(k, (dim,), jnp.float32))(keys)


def _labels(keys: jax.Array, n_classes: int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.randint(k, (), 0, n_classes, jnp.int32))(keys)


def _pmean(tree):
  return jax.lax.pmean(tree, parallel.AXIS)


def unroll_d_steps(config: ml_collections.ConfigDict) -> bool:
  """config.train.d_steps_lowering resolved for the default backend ("auto": unroll on CPU)."""
  setting = config.train.d_steps_lowering
  if setting not in ("auto", "unroll", "loop"):
    raise ValueError(f"config.train.d_steps_lowering={setting!r}; "
                     f"valid choices: ('auto', 'unroll', 'loop')")
  if setting == "auto":
    return jax.default_backend() == "cpu"
  return setting == "unroll"


# ------------------------------------------------------------------ the method
class GAN(method_lib.Method):
  """NDA-GAN on the generic loop: host batches are [num_d_steps, B, ...]."""

  batch_axis = 1

  @property
  def examples_per_step(self) -> int:
    return int(self.config.train.batch_size * self.config.train.num_d_steps)

  @property
  def steps_per_epoch(self) -> int:
    """Iterations per epoch: floor(N / (batch_size * num_d_steps)), as the official loader."""
    return super().steps_per_epoch

  @property
  def artifact_every(self) -> int:
    return int(self.config.sample.every)

  def validate(self, num_devices: int) -> None:
    super().validate(num_devices)
    for key in ("train.num_d_steps", "model.ch", "model.dim_z", "sample.per_row",
                "sample.scale"):
      method_lib.check_range(self.config, key, low=1, integer=True)
    for key in ("sample.every", "train.ema_start"):
      method_lib.check_range(self.config, key, low=0, integer=True)
    for key in ("loss.alpha", "loss.beta"):      # Weights of the fakes' terms.
      method_lib.check_range(self.config, key, low=0)
    method_lib.check_range(self.config, "train.ema_decay", low=0, high=1)
    build_models(self.config)                    # sample_bn, dtype.
    biggan.generator_arch(self.config.data.image_size)   # A supported resolution.
    negative.build_nda(self.config.nda)          # Fails early, naming the valid NDAs.
    losses.get_loss(self.config.loss.kind)       # Likewise for the loss kind.
    unroll_d_steps(self.config)
    for part in ("g", "d"):
      optim.validate(self.config.optim[part], f"config.optim.{part}")

  def optimizers(self) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(G's, D's): Adam(0, 0.999) at 2e-4 in the paper recipe."""
    sizes = dict(steps_per_epoch=self.steps_per_epoch, total_steps=max(self.total_steps, 1))
    return optim.build(self.config.optim.g, **sizes), optim.build(self.config.optim.d, **sizes)

  def init_state(self, rng: jax.Array) -> GANState:
    config = self.config
    generator, discriminator = build_models(config, axis_name=None)
    g_key, d_key, train_key = jax.random.split(rng, 3)
    res, c = config.data.image_size, config.data.channels
    z = jnp.zeros((2, config.model.dim_z), jnp.float32)
    y = jnp.zeros((2,), jnp.int32)
    # Under jit: eager init compiles every random op on its own (slow on CPU).
    init = lambda module, *args: jax.jit(functools.partial(module.init, train=False))(*args)
    g_vars = init(generator, g_key, z, y)
    d_vars = init(discriminator, d_key, jnp.zeros((2, res, res, c), jnp.float32), y)
    g_tx, d_tx = self.optimizers()
    return GANState(
        step=jnp.zeros((), jnp.int32), rng=train_key,
        g_params=g_vars["params"], g_stats=g_vars.get("batch_stats", {}),
        d_params=d_vars["params"], d_stats=d_vars.get("batch_stats", {}),
        g_opt=g_tx.init(g_vars["params"]), d_opt=d_tx.init(d_vars["params"]),
        # Copies: the EMA must not alias G's buffers (the state is donated to each step).
        ema_params=jax.tree.map(jnp.copy, g_vars["params"]),
        ema_stats=jax.tree.map(jnp.copy, g_vars.get("batch_stats", {})))

  def step_batch(self, host_batch: method_lib.Batch) -> method_lib.Batch:
    """[num_d_steps * B, ...] -> [num_d_steps, B, ...]: one real batch per D step."""
    num_d = self.config.train.num_d_steps
    return {k: host_batch[k].reshape((num_d, -1) + host_batch[k].shape[1:])
            for k in ("image", "label")}

  def make_step(self) -> method_lib.StepFn:
    """The per-device function of one iteration: (state, batch) -> (state, metrics).

    batch: {'image': uint8 [num_d_steps, b, H, W, C], 'label': int32 [num_d_steps, b]},
    this device's share b of each D step's real batch.
    """
    config = self.config
    generator, discriminator = build_models(config)
    g_tx, d_tx = self.optimizers()
    parts = StepParts(generator=generator, discriminator=discriminator,
                      nda_fn=negative.build_nda(config.nda, axis_name=parallel.AXIS),
                      g_tx=g_tx, d_tx=d_tx, loss=config.loss, dim_z=config.model.dim_z,
                      n_classes=num_classes(config))
    d_step = functools.partial(discriminator_step, parts)
    unroll = unroll_d_steps(config)

    def iteration(state: GANState, batch: dict) -> tuple[GANState, dict]:
      images, labels = batch["image"], batch["label"]
      num_d, b = images.shape[:2]
      labels = labels if parts.n_classes > 1 else jnp.zeros_like(labels)
      it_key = jax.random.fold_in(state.rng, state.step)
      carry = (state.g_params, state.g_stats, state.d_params, state.d_stats, state.d_opt, it_key)
      carry, d_metrics = jax.lax.scan(d_step, carry, (jnp.arange(num_d), images, labels),
                                      unroll=num_d if unroll else 1)
      g_params, g_stats, d_params, d_stats, d_opt, _ = carry
      z, y = sample_latents(parts, jax.random.fold_in(it_key, num_d), b)
      g_params, g_stats, d_stats, g_opt, g_metrics = generator_step(
          parts, g_params, g_stats, state.g_opt, d_params, d_stats, z, y)
      ema_params, ema_stats = ema_update(state, g_params, g_stats, ema_start=config.train.ema_start,
                                         decay=config.train.ema_decay)
      new_state = state.replace(
          step=state.step + 1, g_params=g_params, g_stats=g_stats, d_params=d_params,
          d_stats=d_stats, g_opt=g_opt, d_opt=d_opt, ema_params=ema_params, ema_stats=ema_stats)
      return new_state, {**{k: v.mean() for k, v in d_metrics.items()}, **g_metrics}

    return iteration

  # ---------------------------------------------------------------- evaluation
  def make_eval_fns(self, dp: parallel.DataParallel) -> dict[str, Callable[..., Any]]:
    """sample_fn(state, rng, n) from G_ema; score_fn(state, images, labels) = D(x)."""
    sampler = make_sampler(self.config)
    return {"sample_fn": functools.partial(_sample_for_eval, self.config, sampler),
            "score_fn": make_scorer(self.config, dp)}

  def artifacts(self, state: GANState, workdir: str, step: int) -> None:
    """The sample sheet: fixed latents, one row per class, EMA generator."""
    images = sheet_images(self.config, self._sheet_sampler, state)
    if jax.process_index() == 0:
      path = workdir_lib.path(workdir) / "samples" / f"step_{step:07d}.png"
      visualize.save_grid(path, images, ncol=self.config.sample.per_row,
                          scale=self.config.sample.scale)

  @functools.cached_property
  def _sheet_sampler(self):
    return make_sampler(self.config)


# ------------------------------------------------------------------ one iteration's parts
class StepParts(NamedTuple):
  """What the D steps, the G step and the latents of an iteration are built from."""
  generator: biggan.Generator
  discriminator: biggan.Discriminator
  nda_fn: Callable[[jax.Array, jax.Array], jax.Array]
  g_tx: optax.GradientTransformation
  d_tx: optax.GradientTransformation
  loss: ml_collections.ConfigDict   # config.loss: kind, alpha, beta
  dim_z: int
  n_classes: int


def sample_latents(parts: StepParts, key: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """(z, fake labels) for this device's b examples, from per-example keys."""
  z = _normal(parallel.per_example_keys(jax.random.fold_in(key, 0), b), parts.dim_z)
  y = _labels(parallel.per_example_keys(jax.random.fold_in(key, 1), b), parts.n_classes)
  return z, y


def discriminator_step(parts: StepParts, carry: tuple, xs: tuple) -> tuple[tuple, dict]:
  """One D update on a real batch, its NDA batch and fresh fakes (a `lax.scan` body).

  carry: (g_params, g_stats, d_params, d_stats, d_opt, iteration key); xs: (D step j,
  uint8 images [b, H, W, C], labels [b]). G runs in train mode without gradients (BN
  batch statistics, running stats and SN vectors updated), as in the official D step.
  """
  g_params, g_stats, d_params, d_stats, d_opt, key = carry
  j, images_u8, y_real = xs
  b = images_u8.shape[0]
  step_key = jax.random.fold_in(key, j)
  real = images_lib.to_float(images_u8)
  z, y_fake = sample_latents(parts, jax.random.fold_in(step_key, 0), b)
  nda = parts.nda_fn(parallel.per_example_keys(jax.random.fold_in(step_key, 1), b), real)
  fake, g_mut = parts.generator.apply({"params": g_params, "batch_stats": g_stats}, z, y_fake,
                                      train=True, mutable=["batch_stats"])
  fake = jax.lax.stop_gradient(fake)

  def loss_fn(params):
    # One forward of [fake; real; NDA]: D has no BN, so this equals separate calls.
    logits, d_mut = parts.discriminator.apply(
        {"params": params, "batch_stats": d_stats},
        jnp.concatenate([fake, real, nda.astype(real.dtype)]),
        jnp.concatenate([y_fake, y_real, y_real]), train=True, mutable=["batch_stats"])
    d_fake, d_real, d_nda = jnp.split(logits, 3)
    loss, terms = losses.discriminator_loss(d_real, d_fake, d_nda, alpha=parts.loss.alpha,
                                            beta=parts.loss.beta, kind=parts.loss.kind)
    aux = dict(terms, d_real=d_real.mean(), d_fake=d_fake.mean(), d_nda=d_nda.mean())
    return loss, (aux, d_mut["batch_stats"])

  (loss, (aux, d_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_params)
  grads = _pmean(grads)
  updates, d_opt = parts.d_tx.update(grads, d_opt, d_params)
  d_params = optax.apply_updates(d_params, updates)
  aux = dict(aux, d_loss=loss, d_grad_norm=optax.tree.norm(grads))
  return (g_params, g_mut["batch_stats"], d_params, d_stats, d_opt, key), _pmean(aux)


def generator_step(parts: StepParts, g_params, g_stats, g_opt, d_params, d_stats,
                   z: jax.Array, y: jax.Array):
  """One G update through D on samples of (z, y).

  Returns (g_params, g_stats, d_stats, g_opt, {'g_loss', 'g_grad_norm'}).
  """
  def loss_fn(params):
    fake, g_mut = parts.generator.apply({"params": params, "batch_stats": g_stats}, z, y,
                                        train=True, mutable=["batch_stats"])
    logits, d_mut = parts.discriminator.apply({"params": d_params, "batch_stats": d_stats},
                                              fake, y, train=True, mutable=["batch_stats"])
    return losses.generator_loss(logits, kind=parts.loss.kind), (g_mut["batch_stats"],
                                                                 d_mut["batch_stats"])

  (loss, (g_stats, d_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(g_params)
  grads = _pmean(grads)
  updates, g_opt = parts.g_tx.update(grads, g_opt, g_params)
  g_params = optax.apply_updates(g_params, updates)
  return g_params, g_stats, d_stats, g_opt, {"g_loss": _pmean(loss),
                                             "g_grad_norm": optax.tree.norm(grads)}


def ema_update(state: GANState, g_params: PyTree, g_stats: PyTree, *, ema_start: int,
               decay: float) -> tuple[PyTree, PyTree]:
  """The EMA of G (params and statistics); an exact copy before `ema_start`."""
  decay = jnp.where(state.step < ema_start, 0.0, decay)
  ema = lambda e, p: decay * e + (1.0 - decay) * p
  return (jax.tree.map(ema, state.ema_params, g_params),
          jax.tree.map(ema, state.ema_stats, g_stats))


# ------------------------------------------------------------------ sampling
def make_sampler(config: ml_collections.ConfigDict, ema: bool = True) -> Callable[..., jax.Array]:
  """jit-ed `sample(state, z, y) -> images in [-1, 1]`.

  With config.model.sample_bn == 'batch' (official evaluation) G's BN uses the
  statistics of the sample batch; 'running' uses the stored running averages.
  A batch sharded over the mesh gives the same result as on one device.
  """
  generator, _ = build_models(config, axis_name=None)

  @jax.jit
  def sample(state: GANState, z: jax.Array, y: jax.Array) -> jax.Array:
    params, stats = ((state.ema_params, state.ema_stats) if ema
                     else (state.g_params, state.g_stats))
    return generator.apply({"params": params, "batch_stats": stats}, z, y, train=False)
  return sample


def fixed_latents(config: ml_collections.ConfigDict, num: int, seed: int = 0):
  """The sample sheet's latents: `num` per class row when conditional."""
  n_classes = num_classes(config)
  rows = n_classes if n_classes > 1 else 1
  key = jax.random.PRNGKey(seed)
  z = jax.random.normal(key, (rows * num, config.model.dim_z), jnp.float32)
  y = jnp.repeat(jnp.arange(rows, dtype=jnp.int32), num)
  return z, y


def sample_in_batches(sample: Callable, state: GANState, z: np.ndarray, y: np.ndarray,
                      batch_size: int) -> np.ndarray:
  """Samples len(z) images in batches of `batch_size` (BN statistics per batch)."""
  out = []
  for start in range(0, len(z), batch_size):
    zb, yb = z[start:start + batch_size], y[start:start + batch_size]
    out.append(np.asarray(jax.device_get(sample(state, jnp.asarray(zb), jnp.asarray(yb)))))
  return np.concatenate(out)


def sheet_images(config, sample, state: GANState) -> np.ndarray:
  z, y = fixed_latents(config, config.sample.per_row, seed=config.sample.seed)
  return sample_in_batches(sample, state, z, y, batch_size=len(z))


def latents(key: jax.Array, num: int, dim_z: int, truncation: float = 0.0) -> jax.Array:
  """[num, dim_z] N(0, 1) latents; with truncation t > 0 the normal truncated to [-t, t].

  BigGAN's truncation trick as StudioGAN and BigGAN's samplers draw it
  (scipy's truncnorm(-t, t): values beyond t redrawn, not clipped, not rescaled);
  jax.random.truncated_normal samples that distribution by its inverse CDF.
  """
  if truncation < 0:
    raise ValueError(f"truncation={truncation}: use a threshold > 0, or 0 for none")
  if truncation:
    return jax.random.truncated_normal(key, -truncation, truncation, (num, dim_z), jnp.float32)
  return jax.random.normal(key, (num, dim_z), jnp.float32)


def _sample_for_eval(config, sampler, state, rng: jax.Array, num: int,
                     truncation: float = 0.0, labels: np.ndarray | None = None) -> np.ndarray:
  """`num` EMA samples drawn as one batch: G's BN statistics over the `num` samples, so
  the evaluator's `sample_batch_size` (64 in the official protocol) is the BN batch.
  Classes uniform at random, or `labels` [num] (a conditional model only)."""
  n_classes = num_classes(config)
  z_key, y_key = jax.random.split(rng)
  z = np.asarray(latents(z_key, num, config.model.dim_z, truncation))
  if labels is None:
    y = np.asarray(jax.random.randint(y_key, (num,), 0, n_classes, jnp.int32))
  elif n_classes < 2:
    raise ValueError("samples of given classes (intra-class FID) need a conditional model; "
                     "this one is unconditional (config.model.conditional=False)")
  else:
    y = np.asarray(labels, np.int32)
  return sample_in_batches(sampler, state, z, y, num)


def make_scorer(config: ml_collections.ConfigDict,
                dp: parallel.DataParallel | None = None) -> Callable[..., jax.Array]:
  """`score(state, images, labels) -> D(x)` [B], the anomaly score.

  Images in the training normalisation [-1, 1]; unconditional models score
  every image as class 0, as they were trained. SN vectors are not updated.
  With `dp`, batches split over the mesh are scored per device (shard_map).
  """
  _, discriminator = build_models(config, axis_name=None)
  n_classes = num_classes(config)

  def score(state: GANState, images: jax.Array, labels: jax.Array) -> jax.Array:
    labels = labels if n_classes > 1 else jnp.zeros_like(labels)
    return discriminator.apply({"params": state.d_params, "batch_stats": state.d_stats},
                               images.astype(jnp.float32), labels, train=False)

  if dp is None:
    return jax.jit(score)
  batch = jax.sharding.PartitionSpec(parallel.AXIS)
  return dp.map_fn(score, in_specs=(jax.sharding.PartitionSpec(), batch, batch),
                   out_specs=batch)
