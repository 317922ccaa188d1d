"""NDA-GAN training: BigGAN whose discriminator also sees NDA(real) as fakes.

One jit-compiled iteration (as the official `train_fns_aug.GAN_training_function`):
`num_d_steps` D updates, each on a new real batch with its own NDA batch made on
device from that real batch, then one G update, then the EMA of G. It is written
as a per-device function: gradients and G's BN statistics are averaged over the
mesh axis `data`, and per-sample randomness (z, fake labels, NDA draws) is folded
from the global example index, so the numbers do not depend on the device count.
"""
import functools
import os
from typing import Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nda_jax import checkpoint as ckpt_lib
from nda_jax import losses
from nda_jax import parallel
from nda_jax import visualize
from nda_jax.augment import negative
from nda_jax.data import pipeline
from nda_jax.models import biggan
from nda_jax.trainers import common

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
                   conv_impl=m.conv_impl)
  generator = biggan.Generator(dim_z=m.dim_z, axis_name=axis_name, out_channels=config.data.channels,
                               sample_with_batch_stats=m.sample_bn == "batch", **common_kw)
  discriminator = biggan.Discriminator(in_channels=config.data.channels, **common_kw)
  return generator, discriminator


def make_optimizer(lr: float, optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)


def init_state(config: ml_collections.ConfigDict, rng: jax.Array) -> GANState:
  generator, discriminator = build_models(config, axis_name=None)
  g_key, d_key, train_key = jax.random.split(rng, 3)
  res, c = config.data.image_size, config.data.channels
  z = jnp.zeros((2, config.model.dim_z), jnp.float32)
  y = jnp.zeros((2,), jnp.int32)
  # Under jit: eager init compiles every random op on its own (slow on CPU).
  init = lambda module, *args: jax.jit(functools.partial(module.init, train=False))(*args)
  g_vars = init(generator, g_key, z, y)
  d_vars = init(discriminator, d_key, jnp.zeros((2, res, res, c), jnp.float32), y)
  g_tx = make_optimizer(config.optim.g_lr, config.optim)
  d_tx = make_optimizer(config.optim.d_lr, config.optim)
  return GANState(
      step=jnp.zeros((), jnp.int32), rng=train_key,
      g_params=g_vars["params"], g_stats=g_vars.get("batch_stats", {}),
      d_params=d_vars["params"], d_stats=d_vars.get("batch_stats", {}),
      g_opt=g_tx.init(g_vars["params"]), d_opt=d_tx.init(d_vars["params"]),
      # Copies: the EMA must not alias G's buffers (the state is donated to each step).
      ema_params=jax.tree.map(jnp.copy, g_vars["params"]),
      ema_stats=jax.tree.map(jnp.copy, g_vars.get("batch_stats", {})))


# ------------------------------------------------------------------ one iteration
def _to_float(images_u8: jax.Array) -> jax.Array:
  return images_u8.astype(jnp.float32) / 127.5 - 1.0


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


def make_iteration(config: ml_collections.ConfigDict) -> Callable[[GANState, dict], tuple]:
  """The per-device function of one iteration: (state, batch) -> (state, metrics).

  batch: {'image': uint8 [num_d_steps, b, H, W, C], 'label': int32 [num_d_steps, b]},
  this device's share b of each D step's real batch.
  """
  generator, discriminator = build_models(config)
  nda_fn = negative.build_nda(config.nda)
  g_tx = make_optimizer(config.optim.g_lr, config.optim)
  d_tx = make_optimizer(config.optim.d_lr, config.optim)
  loss_cfg, train_cfg = config.loss, config.train
  n_classes, dim_z = num_classes(config), config.model.dim_z

  def sample_latents(key, b):
    z = _normal(parallel.per_example_keys(jax.random.fold_in(key, 0), b), dim_z)
    y = _labels(parallel.per_example_keys(jax.random.fold_in(key, 1), b), n_classes)
    return z, y

  def d_step(carry, xs):
    g_params, g_stats, d_params, d_stats, d_opt, key = carry
    j, images_u8, y_real = xs
    b = images_u8.shape[0]
    step_key = jax.random.fold_in(key, j)
    real = _to_float(images_u8)
    z, y_fake = sample_latents(jax.random.fold_in(step_key, 0), b)
    nda = nda_fn(parallel.per_example_keys(jax.random.fold_in(step_key, 1), b), real)
    # G runs in train mode without gradients (BN batch statistics, running stats
    # and SN vectors updated), as in the official D step.
    fake, g_mut = generator.apply({"params": g_params, "batch_stats": g_stats}, z, y_fake,
                                  train=True, mutable=["batch_stats"])
    fake = jax.lax.stop_gradient(fake)

    def loss_fn(params):
      # One forward of [fake; real; NDA]: D has no BN, so this equals separate calls.
      logits, d_mut = discriminator.apply(
          {"params": params, "batch_stats": d_stats},
          jnp.concatenate([fake, real, nda.astype(real.dtype)]),
          jnp.concatenate([y_fake, y_real, y_real]), train=True, mutable=["batch_stats"])
      d_fake, d_real, d_nda = jnp.split(logits, 3)
      loss, terms = losses.discriminator_loss(d_real, d_fake, d_nda, alpha=loss_cfg.alpha,
                                              beta=loss_cfg.beta, kind=loss_cfg.kind)
      aux = dict(terms, d_real=d_real.mean(), d_fake=d_fake.mean(), d_nda=d_nda.mean())
      return loss, (aux, d_mut["batch_stats"])

    (loss, (aux, d_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_params)
    grads = _pmean(grads)
    updates, d_opt = d_tx.update(grads, d_opt, d_params)
    d_params = optax.apply_updates(d_params, updates)
    aux = dict(aux, d_loss=loss, d_grad_norm=optax.tree.norm(grads))
    carry = (g_params, g_mut["batch_stats"], d_params, d_stats, d_opt, key)
    return carry, _pmean(aux)

  def iteration(state: GANState, batch: dict) -> tuple[GANState, dict]:
    images, labels = batch["image"], batch["label"]
    num_d, b = images.shape[:2]
    labels = labels if n_classes > 1 else jnp.zeros_like(labels)
    it_key = jax.random.fold_in(state.rng, state.step)
    carry = (state.g_params, state.g_stats, state.d_params, state.d_stats, state.d_opt, it_key)
    carry, d_metrics = jax.lax.scan(d_step, carry, (jnp.arange(num_d), images, labels),
                                    unroll=num_d if unroll_d_steps(config) else 1)
    g_params, g_stats, d_params, d_stats, d_opt, _ = carry

    z, y = sample_latents(jax.random.fold_in(it_key, num_d), b)

    def g_loss_fn(params):
      fake, g_mut = generator.apply({"params": params, "batch_stats": g_stats}, z, y,
                                    train=True, mutable=["batch_stats"])
      logits, d_mut = discriminator.apply({"params": d_params, "batch_stats": d_stats}, fake, y,
                                          train=True, mutable=["batch_stats"])
      return losses.generator_loss(logits, kind=loss_cfg.kind), (g_mut["batch_stats"],
                                                                 d_mut["batch_stats"])

    (g_loss, (g_stats, d_stats)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
    g_grads = _pmean(g_grads)
    updates, g_opt = g_tx.update(g_grads, state.g_opt, g_params)
    g_params = optax.apply_updates(g_params, updates)

    # EMA of G (params and statistics); an exact copy before ema_start.
    decay = jnp.where(state.step < train_cfg.ema_start, 0.0, train_cfg.ema_decay)
    ema = lambda e, p: decay * e + (1.0 - decay) * p
    new_state = state.replace(
        step=state.step + 1, g_params=g_params, g_stats=g_stats, d_params=d_params,
        d_stats=d_stats, g_opt=g_opt, d_opt=d_opt,
        ema_params=jax.tree.map(ema, state.ema_params, g_params),
        ema_stats=jax.tree.map(ema, state.ema_stats, g_stats))
    metrics = {k: v.mean() for k, v in d_metrics.items()}
    metrics.update(g_loss=_pmean(g_loss), g_grad_norm=optax.tree.norm(g_grads))
    return new_state, metrics

  return iteration


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


def save_sample_sheet(config, sample, state: GANState, path: str) -> None:
  num = config.sample.per_row
  z, y = fixed_latents(config, num, seed=config.sample.seed)
  images = sample_in_batches(sample, state, z, y, batch_size=len(z))
  visualize.save_grid(path, images, ncol=num, scale=config.sample.scale)


# ------------------------------------------------------------------ the loop
def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """config.train.total_steps, or num_epochs of floor(N / images per iteration)."""
  if config.train.total_steps:
    return int(config.train.total_steps)
  per_iteration = config.train.batch_size * config.train.num_d_steps
  return int(config.train.num_epochs * (num_train_examples // per_iteration))


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  if config.train.batch_size % num_devices:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} must be divisible by "
                     f"the {num_devices} devices")
  negative.build_nda(config.nda)          # Fails early, naming the valid NDAs.
  losses.get_loss(config.loss.kind)       # Likewise for the loss kind.
  unroll_d_steps(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from `workdir` when it holds a checkpoint); returns the last metrics."""
  dp = parallel.DataParallel(config.parallel, config.max_devices)
  validate(config, dp.num_devices)
  per_iteration = config.train.batch_size * config.train.num_d_steps
  data_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=per_iteration, seed=config.seed)
  if data_iter.num_classes != config.data.num_classes:
    raise ValueError(f"config.data.num_classes={config.data.num_classes} but {data_iter.source!r} "
                     f"has {data_iter.num_classes} classes")
  steps_total = total_steps(config, len(data_iter.source))

  checkpointer = ckpt_lib.Checkpointer(
      workdir, keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
      best_metric=config.checkpoint.best_metric, best_mode=config.checkpoint.best_mode,
      async_save=config.checkpoint.async_save)
  state = init_state(config, jax.random.PRNGKey(config.seed))
  start = checkpointer.latest_step()
  if start is not None:
    abstract = ckpt_lib.abstract_like(state, dp.replicated_sharding())
    state, data_state = checkpointer.restore(start, abstract)
    if data_state is not None:
      data_iter.set_state(data_state.encode())
    logging.info("resumed from step %d in %s", start, workdir)
  first_step = int(jax.device_get(state.step))
  state = dp.put_state(state)

  step_fn = dp.step(make_iteration(config), batch_axis=1)
  sampler = make_sampler(config)
  writer = common.MetricWriter(workdir)
  progress = common.Progress(steps_total, per_iteration, first_step)
  guard = ckpt_lib.PreemptionGuard()
  block = parallel.must_block_each_step()
  evaluators = _make_evaluators(config, workdir, dp.mesh)
  metrics: dict[str, float] = {}
  step = first_step

  def save(step, eval_metrics=None):
    checkpointer.save(step, dp.get_state(state), data_iter.get_state().decode(),
                      metrics=eval_metrics)

  try:
    while step < steps_total:
      host_batch = next(data_iter)
      batch = {k: v.reshape((config.train.num_d_steps, -1) + v.shape[1:])
               for k, v in host_batch.items() if k in ("image", "label")}
      state, device_metrics = step_fn(state, dp.shard_batch(batch, batch_axis=1))
      step += 1
      if block:
        common.block_tree(device_metrics)
      stop = guard.requested   # Read once: a signal arriving later stops the next iteration.
      last = step == steps_total or stop
      to_log = step % config.train.log_every == 0 or last
      to_save = step % config.checkpoint.every == 0 or last
      if to_log or to_save:   # A non-finite state is never checkpointed.
        metrics = dp.unreplicate_metrics(device_metrics)
        common.check_finite(step, metrics, workdir)
      if to_log:
        metrics.update(progress.update(step))
        writer.write(step, metrics)
        common.log_progress(step, steps_total, metrics)
      if config.sample.every and (step % config.sample.every == 0 or last):
        save_sample_sheet(config, sampler, dp.get_state(state),
                          os.path.join(workdir, "samples", f"step_{step:07d}.png"))
      eval_metrics = None
      if evaluators and (step % config.eval.every == 0 or step == steps_total):
        eval_metrics = run_evaluators(evaluators, config, dp.get_state(state), sampler)
        writer.write(step, eval_metrics)
        metrics.update(eval_metrics)
        logging.info("step %d eval: %s", step, eval_metrics)
      if to_save or eval_metrics:
        save(step, eval_metrics)
      if stop:
        logging.warning("stopping at step %d after SIGTERM; checkpoint saved", step)
        break
  finally:
    data_iter.close()
    checkpointer.close()
    writer.close()
    guard.restore_handlers()
  return metrics


# ------------------------------------------------------------------ evaluation hooks
def _make_evaluators(config, workdir, mesh=None):
  """Evaluators named in config.eval.metrics (FID, fd_digits, anomaly, ...), or none."""
  if not config.eval.metrics:
    return []
  from nda_jax import evaluators as evaluators_lib  # Above the trainer in the layering.
  return evaluators_lib.build(config, workdir, mesh=mesh)


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


def run_evaluators(evaluators, config, state: GANState, sampler=None,
                   scorer=None) -> dict[str, float]:
  """Runs each evaluator with the callables it `requires` (sample_fn, score_fn)."""
  sampler = sampler or make_sampler(config)
  scorer = scorer or make_scorer(config, parallel.DataParallel(config.parallel,
                                                               config.max_devices))
  fns = {"sample_fn": functools.partial(_sample_for_eval, config, sampler, state),
         "score_fn": functools.partial(scorer, state)}
  results = {}
  for evaluator in evaluators:
    for name, value in evaluator.run(**{k: fns[k] for k in evaluator.requires}):
      results[name] = float(value)
  return results


def _sample_for_eval(config, sampler, state, rng: jax.Array, num: int) -> np.ndarray:
  """`num` EMA samples in the official protocol: batches of the training batch size."""
  n_classes = num_classes(config)
  z_key, y_key = jax.random.split(rng)
  z = np.asarray(jax.random.normal(z_key, (num, config.model.dim_z), jnp.float32))
  y = np.asarray(jax.random.randint(y_key, (num,), 0, n_classes, jnp.int32))
  return sample_in_batches(sampler, state, z, y, config.eval.sample_batch_size)


# ------------------------------------------------------------------ checkpoints outside training
def _checkpointer(config, workdir: str) -> ckpt_lib.Checkpointer:
  return ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                               keep_best=config.checkpoint.keep_best,
                               best_metric=config.checkpoint.best_metric,
                               best_mode=config.checkpoint.best_mode, async_save=False)


def load_state(config, workdir: str, which: str | int = "latest") -> GANState:
  """The TrainState of a run's checkpoint ('latest', 'best' or a step), on one device."""
  checkpointer = _checkpointer(config, workdir)
  try:
    step = checkpointer.resolve_step(which)
    abstract = jax.eval_shape(functools.partial(init_state, config), jax.random.PRNGKey(0))
    abstract = ckpt_lib.abstract_like(
        abstract, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    state, _ = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  return state


def save_imported(workdir: str, config, generator_vars: PyTree, discriminator_vars: PyTree,
                  ema_generator_vars: PyTree | None = None) -> GANState:
  """Writes imported weights (e.g. the official PyTorch release) as a step-0 checkpoint.

  Optimizer states start fresh; `main` on the same workdir fine-tunes from it and
  `sample` / `eval` read it like any checkpoint.
  """
  state = init_state(config, jax.random.PRNGKey(config.seed))
  ema = ema_generator_vars or generator_vars

  def checked(new, old, what):
    if jax.tree.structure(new) != jax.tree.structure(old):
      raise ValueError(f"imported {what} does not match the configured model's structure")
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
      if np.shape(a) != np.shape(b):
        raise ValueError(f"imported {what} has a leaf of shape {np.shape(a)}; the configured "
                         f"model expects {np.shape(b)} (check config.model.ch / conditional)")
    return jax.tree.map(jnp.asarray, new)

  state = state.replace(
      g_params=checked(generator_vars["params"], state.g_params, "G params"),
      g_stats=checked(generator_vars["batch_stats"], state.g_stats, "G batch_stats"),
      d_params=checked(discriminator_vars["params"], state.d_params, "D params"),
      d_stats=checked(discriminator_vars["batch_stats"], state.d_stats, "D batch_stats"),
      ema_params=checked(ema["params"], state.ema_params, "G_ema params"),
      ema_stats=checked(ema["batch_stats"], state.ema_stats, "G_ema batch_stats"))
  g_tx = make_optimizer(config.optim.g_lr, config.optim)
  d_tx = make_optimizer(config.optim.d_lr, config.optim)
  state = state.replace(g_opt=g_tx.init(state.g_params), d_opt=d_tx.init(state.d_params))
  checkpointer = _checkpointer(config, workdir)
  try:
    checkpointer.save(0, state, force=True)
  finally:
    checkpointer.close()
  return state
