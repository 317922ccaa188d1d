"""Evaluators: sample quality (FID / IS / KID, fd_digits) and anomaly detection.

big_vision's shape: an evaluator is built from the config and its `run(...)`
yields `(name, value)` pairs. It depends on the trainer only through
callables, named in its `requires`:
  sample_fn(rng, n) -> n images [n, H, W, C] in [-1, 1]        (fid, is, kid, fd_digits, ...)
  score_fn(images, labels) -> [B] scores, e.g. D(x)           (anomaly)
so a caller runs `ev.run(**{k: fns[k] for k in ev.requires})`.

`config.eval.metrics` names the metrics; metrics of one feature network share
one evaluator (one pass over the samples).
"""
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

ANOMALY = "anomaly"


def valid_metrics() -> tuple[str, ...]:
  from nda_jax.evaluators import fid  # pylint: disable=g-import-not-at-top
  return (*fid.METRICS, ANOMALY)


def build(config: ml_collections.ConfigDict, workdir: str | None = None,
          mesh: jax.sharding.Mesh | None = None,
          metric_names: Sequence[str] | None = None) -> list[Any]:
  """Evaluators for `metric_names` (default config.eval.metrics), in a fixed order."""
  from nda_jax.evaluators import anomaly  # pylint: disable=g-import-not-at-top
  from nda_jax.evaluators import fid  # pylint: disable=g-import-not-at-top
  names = tuple(config.eval.metrics if metric_names is None else metric_names)
  unknown = sorted(set(names) - set(valid_metrics()))
  if unknown:
    raise ValueError(f"Unknown eval metric(s) {unknown}; valid choices: {sorted(valid_metrics())}.")
  by_network: dict[str, list[str]] = {}
  for name in names:
    if name != ANOMALY:
      by_network.setdefault(fid.METRICS[name][0], []).append(name)
  evaluators: list[Any] = [
      fid.SampleQualityEvaluator(config, network, group, workdir=workdir, mesh=mesh)
      for network, group in by_network.items()]
  if ANOMALY in names:
    evaluators.append(anomaly.AnomalyEvaluator(config, workdir=workdir, mesh=mesh))
  return evaluators
