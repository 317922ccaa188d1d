"""What every trainer shares: the metrics writer, the progress line, the NaN guard."""
import json
import math
import os
import time
from typing import Mapping

from absl import logging
import jax


class MetricWriter:
  """JSON-lines log plus TensorBoard event files (tensorboardX: no TensorFlow needed).

  Only process 0 writes; every process may call it.
  """

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # Imported here: heavy, and only process 0 writes.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records a run wrote to `workdir/metrics.jsonl` (for plots and tests)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} the workdir of a run?")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Measures throughput between log points and formats the one-line progress log."""

  def __init__(self, total_steps: int, examples_per_step: int, first_step: int):
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self._t = time.perf_counter()
    self._step = first_step

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self._step, 1)
    sec_per_step = (now - self._t) / steps
    self._t, self._step = now, step
    return {"img_per_sec": self.examples_per_step / sec_per_step,
            "sec_per_step": sec_per_step,
            "eta_hours": (self.total_steps - step) * sec_per_step / 3600.0}

  @staticmethod
  def line(step: int, total: int, scalars: Mapping[str, float]) -> str:
    eta = scalars.get("eta_hours", float("nan"))
    rest = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())
                    if k not in ("img_per_sec", "eta_hours", "sec_per_step"))
    return (f"step {step}/{total} | {scalars.get('img_per_sec', 0):.1f} img/s | "
            f"ETA {eta:.2f} h | {rest}")


def check_finite(step: int, scalars: Mapping[str, float], workdir: str) -> None:
  """Stops a diverged run before a non-finite state can be checkpointed."""
  bad = sorted(k for k, v in scalars.items() if not math.isfinite(v))
  if bad:
    raise FloatingPointError(
        f"non-finite metrics {bad} at step {step}; the last good checkpoint in "
        f"{os.path.join(workdir, 'checkpoints')} is kept (lower the learning rates or "
        f"check the data)")


def log_progress(step: int, total: int, scalars: Mapping[str, float]) -> None:
  logging.info("%s", Progress.line(step, total, scalars))


def block_tree(tree) -> None:
  """Waits for a step's outputs (CPU multi-device rendezvous workaround)."""
  jax.block_until_ready(tree)

