"""Action recognition on a DPC encoder (fine-tuning or a linear probe) — a method on the loop.

DPC's evaluation (TengdaHan/DPC `eval/test.py`, `eval/model_3d_lc.py`): the
LC model is the pretrained R2D3D encoder, the ConvGRU aggregating the blocks
of a clip, the final state pooled over space (`models.dpc.DPC.context`),
then BatchNorm, dropout (0.5) and a linear layer (orthogonal kernel, zero
bias). Cross-entropy on each training clip; Adam, lr 1e-3, weight decay 1e-3
(torch's coupled form), lr x0.1 at epochs 60/80/100 (UCF-101) or
150/250/300 (HMDB-51); `mode`:

  'finetune'  DPC's `--train_what ft`: everything trains, the encoder and
              the ConvGRU at lr / 10 (`optim.lr_mults` {'encoder': 0.1,
              'agg': 0.1}: the parameters' top-level keys are 'encoder',
              'agg' and 'head'); BN in training mode, the ConvGRU's dropout
              (`model.gru_dropout`, 0.1 as DPC) on.
  'linear'    the encoder and the ConvGRU are frozen and run in inference
              mode (running BN averages, no dropout); only the head (BN,
              dropout, linear: at inference an affine map of the pooled
              context, i.e. a linear classifier) trains. The optimizer sees
              only the head, so lr_mults of frozen parts have no effect.

Training views (made on device, one draw per clip, as DPC's
`consistent=True`): a random resized crop of area (0.5, 1) and aspect (3/4,
4/3) scaled to `aug.out_size` (DPC: RandomSizedCrop(224) then Scale(128)),
horizontal flip, and colour jitter (0.5, 0.5, 0.5, 0.25) with p 0.3
(`positive.mocov2_aug_video` without grayscale and blur). Evaluation views:
the central `aug.crop_size` square scaled to `aug.out_size`
(`trainers.dpc.center_view`, DPC's CenterCrop(224) + Scale(128)), both of the
whole 320x240 frames (data/video_frames.py, `data.frame_width`), as DPC's.

The encoder comes from `config.pretrained_workdir`, a DPC run read through
the trainer registry (`trainers.load_run`, checkpoint
`config.pretrained_checkpoint`), and the head starts at DPC's init.
`pretrained_workdir=''` is the untrained baseline (the same model from a
random init). The architecture is `config.model` (the untrained baseline
needs it); a pretrained run must agree with it on ARCHITECTURE_KEYS. As the
linear probe of MoCo (trainers/linear_probe.py), the state holds the encoder
it trains from, so a checkpoint evaluates on its own and a resumed run does
not depend on the pretraining run's later checkpoints.

BatchNorm (encoder and head): statistics over `model.bn_group_size` clips of
the global batch (`batch_norm.query_groups`), device-count independent;
dropout masks come from per-example keys. Checkpoints are chosen on a
held-out part of the training list (`data.val_fraction`, split 'val'), not
on the test split as DPC did; the `video_classification` evaluator reports
clip and video top-1.
"""
import functools
from typing import Any, Callable

import chex
import flax
import flax.linen as nn
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
from nda_jax.models import batch_norm
from nda_jax.models import dpc as dpc_model
from nda_jax.trainers import dpc as dpc_trainer
from nda_jax.trainers import method as method_lib

PyTree = Any

MODES = ("finetune", "linear")
# config.model keys a pretrained DPC run must share (they shape or feed its weights).
ARCHITECTURE_KEYS = ("depth", "width", "seq_len", "gru_kernel", "input_norm")
# Top-level parameter keys: DPC's encoder and ConvGRU, and the classification head.
ENCODER_KEYS = ("encoder", "agg")
TRAINABLE = {"finetune": ENCODER_KEYS + ("head",), "linear": ("head",)}


@flax.struct.dataclass
class VideoClassifierState:
  step: jax.Array
  rng: jax.Array
  params: PyTree            # {'encoder', 'agg', 'head'}
  batch_stats: PyTree       # {'encoder', 'head'}
  opt: optax.OptState       # of the trainable parameters (TRAINABLE[mode])


class LCHead(nn.Module):
  """DPC's LC head on pooled context features [B, D]: BN, dropout, linear -> logits.

  Dropout masks come from per-example `dropout_keys` [B] (device-count
  independent); the linear layer runs in float32 at full precision.
  """
  num_classes: int
  dropout: float = 0.5

  @nn.compact
  def __call__(self, context: jax.Array, *, train: bool, groups: batch_norm.BNGroups | None = None,
               dropout_keys: jax.Array | None = None) -> jax.Array:
    chex.assert_rank(context, 2)
    x = batch_norm.GroupBatchNorm(name="bn")(context.astype(jnp.float32),
                                             use_running_average=not train, groups=groups)
    if train and self.dropout > 0:
      if dropout_keys is None:
        raise ValueError("LCHead: training with dropout > 0 needs per-example dropout_keys")
      keep = 1.0 - self.dropout
      mask = jax.vmap(lambda key: jax.random.bernoulli(key, keep, x.shape[1:]))(dropout_keys)
      x = jnp.where(mask, x / keep, 0.0)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.orthogonal(),
                    bias_init=nn.initializers.zeros, precision=jax.lax.Precision.HIGHEST,
                    name="fc")(x)


def build_dpc(config: ml_collections.ConfigDict) -> dpc_model.DPC:
  """The DPC module whose `context` (encoder + ConvGRU) the classifier runs.

  Its num_seq / pred_step shape only the pretraining task (`DPC.__call__`);
  `context` takes any whole number of blocks, so they are left at DPC's.
  """
  m = config.model
  return dpc_model.DPC(depth=m.depth, width=m.width, seq_len=m.seq_len, gru_kernel=m.gru_kernel,
                       gru_dropout=m.gru_dropout, dtype=method_lib.compute_dtype(config),
                       conv_impl=m.conv_impl)


def build_head(config: ml_collections.ConfigDict) -> LCHead:
  return LCHead(num_classes=config.data.num_classes, dropout=config.model.head_dropout)


def augment(config: ml_collections.ConfigDict, keys: jax.Array, clips: jax.Array) -> jax.Array:
  """DPC's fine-tuning view of float [-1, 1] clips, one key per clip (see the top)."""
  a = config.aug
  return positive.mocov2_aug_video(keys, clips, a.out_size, scale=tuple(a.scale),
                                   ratio=tuple(a.ratio), jitter=tuple(a.jitter),
                                   p_jitter=a.p_jitter, p_gray=0.0, p_blur=0.0, p_flip=a.p_flip)


def _encoder_variables(params: PyTree, batch_stats: PyTree) -> PyTree:
  return {"params": {k: params[k] for k in ENCODER_KEYS},
          "batch_stats": {"encoder": batch_stats["encoder"]}}


class VideoClassifier(method_lib.Method):
  """DPC's LC classifier (finetune or linear). Host batches: uint8 clips [B, T, H, W, C], labels."""

  @property
  def trainable(self) -> tuple[str, ...]:
    return TRAINABLE[self.config.mode]

  # ---------------------------------------------------------------- the pretrained run
  @functools.cached_property
  def pretrained_config(self) -> ml_collections.ConfigDict | None:
    """The config.json of `config.pretrained_workdir`; None for the untrained baseline ('')."""
    workdir = self.config.pretrained_workdir
    if workdir is None:
      raise ValueError("config.pretrained_workdir is not set: pass "
                       "--config.pretrained_workdir=DIR (the workdir of a DPC run), or "
                       "--config.pretrained_workdir='' for the untrained baseline")
    if not workdir:
      return None
    return config_lib.load_run_config(workdir, "config.pretrained_workdir", "dpc",
                                      "the video classifier reads DPC runs (trainer 'dpc')")

  def _check_pretrained(self) -> None:
    c, pretrained = self.config, self.pretrained_config
    if pretrained is None:
      return
    differ = [f"model.{k}={c.model[k]!r} (the run has {pretrained.model[k]!r})"
              for k in ARCHITECTURE_KEYS if c.model[k] != pretrained.model[k]]
    if c.data.channels != pretrained.data.channels:
      differ.append(f"data.channels={c.data.channels} (the run has {pretrained.data.channels})")
    if differ:
      raise ValueError(f"config.pretrained_workdir={c.pretrained_workdir} is a different "
                       f"architecture: set {', '.join(differ)}")
    try:
      trainers.read_checkpoint(pretrained, c.pretrained_workdir, c.pretrained_checkpoint,
                               lambda ckpt, step: step)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"config.pretrained_checkpoint={c.pretrained_checkpoint!r}: {e}") from None

  def validate(self, num_devices: int) -> None:
    super().validate(num_devices)
    c = self.config
    if c.mode not in MODES:
      raise ValueError(f"config.mode={c.mode!r}; valid choices: {MODES}")
    method_lib.compute_dtype(c)
    optim.validate(c.optim, "config.optim")
    b = c.train.batch_size
    if b % c.model.bn_group_size:
      raise ValueError(f"config.model.bn_group_size={c.model.bn_group_size} must divide the "
                       f"batch {b}")
    dpc_trainer.check_clips(c)
    for key in ("model.head_dropout", "model.gru_dropout"):
      method_lib.check_range(c, key, low=0.0, high=0.99)
    for key in ("aug.p_jitter", "aug.p_flip"):
      method_lib.check_range(c, key, low=0.0, high=1.0)
    if c.data.get("label_key") == "direction" and c.aug.p_flip > 0:
      raise ValueError(f"config.aug.p_flip={c.aug.p_flip} with data.label_key='direction': "
                       f"a flipped clip moves the other way, so flipped training clips "
                       f"would carry the wrong label; set --config.aug.p_flip=0")
    low, high = c.aug.scale
    if not 0 < low <= high <= 1:
      raise ValueError(f"config.aug.scale={tuple(c.aug.scale)} must satisfy 0 < low <= high <= 1")
    images_lib.normalize_input(c, jnp.zeros((1, 1, 1, c.data.channels)))
    self._check_pretrained()
    # Model and optimizer errors (e.g. lr_mults naming no parameter group), no compilation.
    jax.eval_shape(self.init_state, jax.random.PRNGKey(0))

  # ---------------------------------------------------------------- state
  def optimizer(self) -> optax.GradientTransformation:
    """config.optim over the trainable parameter groups (lr_mults of frozen ones dropped;
    a key naming no group still reaches optim.build, which rejects it)."""
    frozen = set(TRAINABLE["finetune"]) - set(self.trainable)
    cfg = ml_collections.ConfigDict(self.config.optim.to_dict())
    cfg.lr_mults = {k: v for k, v in self.config.optim.lr_mults.items() if k not in frozen}
    return optim.build(cfg, steps_per_epoch=self.steps_per_epoch,
                       total_steps=max(self.total_steps, 1), where="config.optim")

  def _init_encoder(self, key: jax.Array) -> PyTree:
    """{'params': {'encoder', 'agg'}, 'batch_stats': {'encoder'}} at DPC's random init."""
    c = self.config
    clips = jnp.zeros((1, c.data.num_frames, c.aug.out_size, c.aug.out_size, c.data.channels),
                      jnp.float32)
    return build_dpc(c).init(key, clips, method=dpc_model.DPC.context)

  def pretrained_encoder(self) -> PyTree:
    """The pretrained run's encoder and ConvGRU variables (read from disk)."""
    _, _, state = trainers.load_run(self.config.pretrained_workdir,
                                    self.config.pretrained_checkpoint)
    return _encoder_variables(state.params, state.batch_stats)

  def init_state(self, rng: jax.Array) -> VideoClassifierState:
    init_key, head_key, train_key = jax.random.split(rng, 3)
    c = self.config
    if isinstance(rng, jax.core.Tracer):
      # Traced for the shapes only (a restore target, validation): nothing is read.
      encoder = self._init_encoder(init_key)
    elif self.pretrained_config is None:
      # As trainers/dpc.py: an 'unsafe_rbg' key compiles the init much faster on XLA:CPU.
      rbg_key = jax.random.wrap_key_data(jax.random.bits(init_key, (4,), jnp.uint32),
                                         impl="unsafe_rbg")
      encoder = jax.jit(self._init_encoder)(rbg_key)
    else:
      encoder = self.pretrained_encoder()
    head = build_head(c).init(head_key, jnp.zeros((1, 4 * c.model.width), jnp.float32),
                              train=False)
    params = {**encoder["params"], "head": head["params"]}
    batch_stats = {**encoder["batch_stats"], "head": head["batch_stats"]}
    return VideoClassifierState(
        step=jnp.zeros((), jnp.int32), rng=train_key, params=params, batch_stats=batch_stats,
        opt=self.optimizer().init({k: params[k] for k in self.trainable}))

  # ---------------------------------------------------------------- training
  def make_step(self) -> method_lib.StepFn:
    c = self.config
    dpc, head = build_dpc(c), build_head(c)
    tx = self.optimizer()
    lr_at = optim.learning_rate_schedule(c.optim, steps_per_epoch=self.steps_per_epoch,
                                         total_steps=max(self.total_steps, 1))
    global_batch, trainable = c.train.batch_size, self.trainable
    finetune = c.mode == "finetune"

    def step(state: VideoClassifierState, batch: dict) -> tuple[VideoClassifierState, dict]:
      labels = batch["label"]
      b = labels.shape[0]
      key = jax.random.fold_in(state.rng, state.step)
      keys = lambda salt: parallel.per_example_keys(jax.random.fold_in(key, salt), b)
      clips = images_lib.normalize_input(
          c, augment(c, keys(0), images_lib.to_float(batch["image"])))
      groups = batch_norm.query_groups(b, c.model.bn_group_size, global_batch)

      def features(params):
        """Pooled context [b, D] and the encoder's batch_stats after this step."""
        variables = _encoder_variables(params, state.batch_stats)
        if not finetune:   # Frozen: inference mode, running averages unchanged.
          return dpc.apply(variables, clips, method=dpc_model.DPC.context), variables[
              "batch_stats"]["encoder"]
        context, mutated = dpc.apply(variables, clips, train=True, groups=groups,
                                     dropout_keys=keys(1), mutable=["batch_stats"],
                                     method=dpc_model.DPC.context)
        return context, mutated["batch_stats"]["encoder"]

      frozen = None if finetune else features(state.params)

      def loss_fn(train_params):
        params = {**state.params, **train_params}
        context, encoder_stats = features(params) if finetune else frozen
        logits, mutated = head.apply(
            {"params": params["head"], "batch_stats": state.batch_stats["head"]}, context,
            train=True, groups=groups, dropout_keys=keys(2), mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, {"encoder": encoder_stats, "head": mutated["batch_stats"]})

      train_params = {k: state.params[k] for k in trainable}
      (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          train_params)
      grads = jax.lax.pmean(grads, parallel.AXIS)
      updates, opt = tx.update(grads, state.opt, train_params)
      params = {**state.params, **optax.apply_updates(train_params, updates)}
      metrics = {"loss": loss,
                 "top1": jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))}
      metrics = jax.lax.pmean(metrics, parallel.AXIS)
      metrics["lr"] = lr_at(state.step)
      return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt=opt), metrics

    return step

  # ---------------------------------------------------------------- evaluation
  def make_eval_fns(self, dp: parallel.DataParallel) -> dict[str, Callable[..., Any]]:
    """classify_fn(state, uint8 clips [B, T, H, W, C]) -> logits [B, num_classes]: central
    view, encoder + ConvGRU + head in inference mode; this process's share of a global
    batch, sharded over the mesh."""
    c = self.config
    dpc, head = build_dpc(c), build_head(c)

    def classify(state: VideoClassifierState, clips_u8: jax.Array) -> jax.Array:
      x = images_lib.normalize_input(c, dpc_trainer.center_view(c, images_lib.to_float(clips_u8)))
      context = dpc.apply(_encoder_variables(state.params, state.batch_stats), x,
                          method=dpc_model.DPC.context)
      return head.apply({"params": state.params["head"],
                         "batch_stats": state.batch_stats["head"]}, context, train=False)

    return {"classify_fn": dp.map_over_batch(classify)}
