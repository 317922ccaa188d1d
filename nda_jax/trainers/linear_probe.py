"""Linear classification on a frozen MoCo encoder — a method on the generic loop.

The protocol of facebookresearch/moco `main_lincls.py`: the pre-trained
backbone runs in inference mode (running BN averages, nothing of it changes),
a linear classifier on its pooled features (kernel ~ N(0, 0.01), bias 0) is
trained with SGD (lr 30, momentum 0.9, no weight decay, lr x0.1 at epochs 60
and 80 of 100) on RandomResizedCrop (scale (0.08, 1)) + horizontal flip views;
the crop is made on device from the decoded image, or from the original
photo (`data.crops='host'`, data/crops.py: batches of uint8 [B, 1, S, S, C];
or `'canvas'`: its box drawn on the host, resized in the step); evaluation
(the 'classification' evaluator) center-crops.

The backbone comes from `config.pretrained_workdir`: a MoCo run, or a workdir
written by `python -m nda_jax.importers.moco_pytorch` (released weights),
read through the trainer registry (`trainers.load_run`, checkpoint
`config.pretrained_checkpoint`: 'latest', 'best' or a step), taking the query
encoder's backbone. The encoder's description (`model`, `aug.crop_size`,
`data.channels`) is read from that run's config.json, so a probe config does
not repeat it; the probe's own `dtype` sets the activations' precision.

The frozen backbone is part of the probe's TrainState, so its checkpoints
hold the exact weights that were probed: a pre-training run that goes on (or
rotates its checkpoints out) cannot change the backbone under a resumed
probe, and a probe's checkpoint evaluates on its own. It costs one more copy
of the backbone on disk and in device memory (no optimizer state: only the
classifier is optimized). The pretrained run's config.json is still read for
the architecture, and its checkpoint whenever a fresh state is built (the
loop builds one before it resumes); restore targets are traced without it.
"""
import functools
from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nda_jax import config_lib
from nda_jax import images as images_lib
from nda_jax import optim
from nda_jax import parallel
from nda_jax import trainers
from nda_jax.augment import positive
from nda_jax.models import resnet
from nda_jax.trainers import method as method_lib
from nda_jax.trainers import moco

PyTree = Any
TOPK = (1, 5)            # reported where the task has at least k classes
CLASSIFIER_INIT_STD = 0.01


@flax.struct.dataclass
class LinearProbeState:
  step: jax.Array
  rng: jax.Array
  backbone: PyTree          # frozen: {'params', 'batch_stats'} of the pretrained backbone
  classifier: PyTree        # {'kernel' [F, num_classes], 'bias' [num_classes]}
  opt: optax.OptState       # of the classifier only


def topk_accuracy(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Fraction of examples whose label is among the k largest logits.

  Ties go to the lower class index (`lax.top_k`, as argmax for k=1), so constant
  logits (a dead backbone) do not count as right for every class.
  """
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, logits.shape[:1])
  if not 1 <= k <= logits.shape[-1]:
    raise ValueError(f"top-{k} accuracy needs 1 <= k <= {logits.shape[-1]} classes")
  _, top = jax.lax.top_k(logits, k)
  return jnp.mean(jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32))


def logits_of(classifier: PyTree, features: jax.Array) -> jax.Array:
  """The linear classifier, in float32 at full precision (it is tiny; lr 30 is not)."""
  return jnp.dot(features.astype(jnp.float32), classifier["kernel"],
                 precision=jax.lax.Precision.HIGHEST) + classifier["bias"]


class LinearProbe(method_lib.Method):
  """main_lincls on a MoCo run's frozen backbone. Host batches: uint8 images + labels."""

  # ---------------------------------------------------------------- the pretrained run
  @functools.cached_property
  def pretrained_config(self) -> ml_collections.ConfigDict:
    """The config.json of `config.pretrained_workdir` (ValueError naming the flag)."""
    workdir = self.config.pretrained_workdir
    if not workdir:
      raise ValueError("config.pretrained_workdir is not set: pass "
                       "--config.pretrained_workdir=DIR, the workdir of a MoCo run or of "
                       "`python -m nda_jax.importers.moco_pytorch`")
    return config_lib.load_run_config(
        workdir, "config.pretrained_workdir", "moco",
        "the linear probe reads MoCo runs (trainer 'moco') and workdirs of "
        "nda_jax.importers.moco_pytorch")

  @property
  def encoder_config(self) -> ml_collections.ConfigDict:
    """What moco.build_encoder / normalize_input read: the pretrained `model`, our dtype."""
    return ml_collections.ConfigDict({"model": self.pretrained_config.model,
                                      "dtype": self.config.dtype})

  @property
  def crop_size(self) -> int:
    return int(self.pretrained_config.aug.crop_size)

  def backbone_module(self) -> resnet.ResNet:
    return moco.build_encoder(self.encoder_config).backbone

  def validate(self, num_devices: int) -> None:
    super().validate(num_devices)
    c = self.config
    method_lib.compute_dtype(c)
    optim.validate(c.optim.classifier, "config.optim.classifier")
    low, high = c.aug.scale
    if not 0 < low <= high <= 1:
      raise ValueError(f"config.aug.scale={tuple(c.aug.scale)} must satisfy 0 < low <= high <= 1")
    method_lib.check_range(c, "aug.p_flip", low=0, high=1)
    pretrained = self.pretrained_config
    if c.data.channels != pretrained.data.channels:
      raise ValueError(f"config.data.channels={c.data.channels} but the encoder in "
                       f"{c.pretrained_workdir} takes {pretrained.data.channels}-channel images")
    if moco.host_crops(c):
      moco.check_host_views(c, num=1, size=self.crop_size, scale=c.aug.scale)
    if c.data.image_size < self.crop_size:
      raise ValueError(f"config.data.image_size={c.data.image_size} is smaller than the "
                       f"encoder's crop size {self.crop_size} (its aug.crop_size)")
    try:
      trainers.read_checkpoint(pretrained, c.pretrained_workdir, c.pretrained_checkpoint,
                               lambda ckpt, step: step)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"config.pretrained_checkpoint={c.pretrained_checkpoint!r}: {e}") from None
    # Model and optimizer errors, without compiling or reading the checkpoint.
    jax.eval_shape(self.init_state, jax.random.PRNGKey(0))

  def pretrained_backbone(self) -> PyTree:
    """{'params', 'batch_stats'} of the pretrained query encoder's backbone (read from disk)."""
    _, _, state = trainers.load_run(self.config.pretrained_workdir,
                                    self.config.pretrained_checkpoint)
    return {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}

  # ---------------------------------------------------------------- training
  def optimizer(self) -> optax.GradientTransformation:
    return optim.build(self.config.optim.classifier, steps_per_epoch=self.steps_per_epoch,
                       total_steps=max(self.total_steps, 1), where="config.optim.classifier")

  def init_state(self, rng: jax.Array) -> LinearProbeState:
    init_key, classifier_key, train_key = jax.random.split(rng, 3)
    module = self.backbone_module()
    if isinstance(rng, jax.core.Tracer):
      # Traced for the shapes only (a restore target, validation): the pretrained
      # checkpoint is not read.
      shape = (1, self.crop_size, self.crop_size, self.config.data.channels)
      backbone = module.init(init_key, jnp.zeros(shape, jnp.float32), train=False)
    else:
      backbone = self.pretrained_backbone()
    num_classes = self.config.data.num_classes
    classifier = {
        "kernel": CLASSIFIER_INIT_STD * jax.random.normal(
            classifier_key, (module.num_features, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32)}
    return LinearProbeState(step=jnp.zeros((), jnp.int32), rng=train_key, backbone=backbone,
                            classifier=classifier, opt=self.optimizer().init(classifier))

  def make_step(self) -> method_lib.StepFn:
    c = self.config
    enc = self.encoder_config
    backbone = self.backbone_module()
    tx = self.optimizer()
    lr_at = optim.learning_rate_schedule(c.optim.classifier,
                                         steps_per_epoch=self.steps_per_epoch,
                                         total_steps=max(self.total_steps, 1),
                                         where="config.optim.classifier")
    ks = [k for k in TOPK if k <= c.data.num_classes]
    crop, scale, p_flip = self.crop_size, tuple(c.aug.scale), float(c.aug.p_flip)
    on_host = moco.host_crops(c)
    images_of = moco.step_images(c)

    def step(state: LinearProbeState, batch: dict) -> tuple[LinearProbeState, dict]:
      images = images_of(batch)
      labels = batch["label"]
      b = images.shape[0]
      key = jax.random.fold_in(state.rng, state.step)
      if on_host:   # [b, 1, S, S, C]: the crop of the original photo
        view = images[:, 0]
      else:
        view = positive.random_resized_crop(
            parallel.per_example_keys(jax.random.fold_in(key, 0), b), images, crop, scale=scale)
      view = positive.random_flip(parallel.per_example_keys(jax.random.fold_in(key, 1), b),
                                  view, p=p_flip)
      features = backbone.apply(state.backbone, images_lib.normalize_input(enc, view), train=False)
      features = jax.lax.stop_gradient(features)

      def loss_fn(classifier):
        logits = logits_of(classifier, features)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

      (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.classifier)
      grads = jax.lax.pmean(grads, parallel.AXIS)
      updates, opt = tx.update(grads, state.opt, state.classifier)
      classifier = optax.apply_updates(state.classifier, updates)
      metrics = {"loss": loss, **{f"top{k}": topk_accuracy(logits, labels, k) for k in ks}}
      metrics = jax.lax.pmean(metrics, parallel.AXIS)
      metrics["lr"] = lr_at(state.step)
      return state.replace(step=state.step + 1, classifier=classifier, opt=opt), metrics

    return step

  # ---------------------------------------------------------------- evaluation
  def make_eval_fns(self, dp: parallel.DataParallel) -> dict[str, Callable[..., Any]]:
    """classify_fn(state, uint8 images) -> logits [B, num_classes]: center crop, frozen
    backbone, classifier; this process's share of a global batch, sharded over the mesh."""
    enc, crop = self.encoder_config, self.crop_size
    backbone = self.backbone_module()

    def classify(state: LinearProbeState, images_u8: jax.Array) -> jax.Array:
      x = images_lib.normalize_input(enc, images_lib.center_crop(images_lib.to_float(images_u8),
                                                                 crop))
      return logits_of(state.classifier, backbone.apply(state.backbone, x, train=False))

    return {"classify_fn": dp.map_over_batch(classify)}
