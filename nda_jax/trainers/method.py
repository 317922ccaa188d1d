"""The interface between a training method (GAN, MoCo, DPC, a probe) and the generic loop.

A method says what is specific to it — its TrainState, its per-device step,
the batch its step takes from a host batch (`step_batch`), the callables its evaluators
need, and the artifacts it writes now and then. `loop.train_and_evaluate`
does everything else (data, devices, checkpoints, resume, signals, NaN guard,
logging and evaluation cadence), once for every method. The split follows
deepmind-research byol's experiment vs main loop.
"""
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from nda_jax import parallel

PyTree = Any
Batch = Mapping[str, Any]
StepFn = Callable[[PyTree, Batch], tuple[PyTree, dict[str, jax.Array]]]
# config.dtype -> the activations' dtype; parameters, optimizer states and losses stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_range(config: ml_collections.ConfigDict, key: str, low: float | None = None,
                high: float | None = None, integer: bool = False) -> None:
  """ValueError naming `config.<key>` unless its value is a number in [low, high]."""
  value = config
  for part in key.split("."):
    value = value[part]
  kinds = (int,) if integer else (int, float)
  in_range = (isinstance(value, kinds) and not isinstance(value, bool)
              and (low is None or value >= low) and (high is None or value <= high))
  if not in_range:
    what = "an integer" if integer else "a number"
    bounds = (f"in [{low}, {high}]" if low is not None and high is not None
              else f">= {low}" if low is not None else f"<= {high}")
    raise ValueError(f"config.{key}={value!r}: must be {what} {bounds}")


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """config.dtype as the dtype models compute activations in (a clear error if unknown)."""
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}; valid choices: {sorted(DTYPES)}")
  return DTYPES[config.dtype]


class Method:
  """Base class: override what differs. The TrainState must have `.step` and `.rng`."""

  # The axis of a host batch that is split over devices (the GAN's batches are
  # [num_d_steps, B, ...]: axis 1).
  batch_axis: int = 0

  def __init__(self, config: ml_collections.ConfigDict, num_train_examples: int | None = None):
    """`num_train_examples` sizes epoch-based schedules; None where only the state's
    structure matters (loading a checkpoint for inference). The loop sets it once
    the training data is open, before it builds the state or the step."""
    self.config = config
    self.num_train_examples = num_train_examples

  # ------------------------------------------------------------------ sizes
  @property
  def examples_per_step(self) -> int:
    """Training examples (over all devices and hosts) one step consumes."""
    return int(self.config.train.batch_size)

  @property
  def steps_per_epoch(self) -> int:
    if not self.num_train_examples:
      return 1
    return max(self.num_train_examples // self.examples_per_step, 1)

  @property
  def total_steps(self) -> int:
    """config.train.total_steps, or num_epochs of the training split."""
    if self.config.train.total_steps:
      return int(self.config.train.total_steps)
    return int(self.config.train.num_epochs * self.steps_per_epoch)

  def validate(self, num_devices: int) -> None:
    """Raises ValueError for a config this method cannot run, before any work."""
    check_range(self.config, "train.batch_size", low=1, integer=True)
    if self.config.train.batch_size % num_devices:
      raise ValueError(f"config.train.batch_size={self.config.train.batch_size} must be "
                       f"divisible by the {num_devices} devices")

  # ------------------------------------------------------------------ training
  def init_state(self, rng: jax.Array) -> PyTree:
    raise NotImplementedError

  def step_batch(self, host_batch: Batch) -> Batch:
    """This process's host batch -> the arrays the step takes (uint8 images stay uint8;
    'boxes' go along with a canvas, data/pipeline.py)."""
    return {k: host_batch[k] for k in ("image", "label", "boxes") if k in host_batch}

  def make_step(self) -> StepFn:
    """The per-device step (state, batch) -> (state, metrics), with named-axis collectives
    over `parallel.AXIS`; metrics are scalars already averaged over devices."""
    raise NotImplementedError

  # ------------------------------------------------------------------ evaluation
  def make_eval_fns(self, dp: parallel.DataParallel) -> dict[str, Callable[..., Any]]:
    """Callables evaluators may require, each `fn(state, ...)`, built (and jitted) once per run:
    'sample_fn' (rng, n), 'score_fn' (images, labels), 'embed_fn' (uint8 images)."""
    del dp
    return {}

  artifact_every: int = 0   # steps between `artifacts` calls (and at the end); 0: never

  def artifacts(self, state: PyTree, workdir: str, step: int) -> None:
    """Periodic outputs other than metrics (the GAN's sample sheet). Called on every
    process (computations on global arrays need all of them); only process 0 writes."""
    del state, workdir, step
