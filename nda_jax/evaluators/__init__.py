"""Evaluators by type: a registry, their declared configs, and building them from `config.evals`.

big_vision's shape: `config.evals` is a ConfigDict of named evaluators, each
`config.evals.<name>` the full `default_config(<type>)` with overrides:
`type` (a key of REGISTRY), `every` (training steps between runs; 0: only at
the end of training) and the keys its class declares. Nothing reads an
undeclared key, so `--config.evals.<name>.<key>=...` is checked against them.

An evaluator class has
  __init__(cfg, data_cfg, *, workdir, mesh)   its own entry and the run's data config;
  requires: tuple[str, ...]                   the callables `run` takes;
  default_config() -> ConfigDict              every key it reads, incl. type and every;
  run(**fns) -> Iterable[(metric, value)].
It depends on the trainer only through those callables:
  sample_fn(rng, n[, truncation][, labels]) -> n images [n, H, W, C] in [-1, 1]  (sample_quality;
                                                labels [n]: of those classes)
  score_fn(images, labels) -> [B] scores, e.g. D(x)        (anomaly)
  embed_fn(images uint8) -> [B, D] features                (knn)
so a caller runs `ev.run(**{k: fns[k] for k in ev.requires})`. A new metric is
one module and one REGISTRY line.
"""
from collections.abc import Iterable, Mapping
import importlib
from typing import Any

import jax
import ml_collections

from nda_jax import config_lib

# type -> "module:Class"; a module is imported only when its type is used.
REGISTRY: dict[str, str] = {
    "sample_quality": "nda_jax.evaluators.fid:SampleQualityEvaluator",
    "anomaly": "nda_jax.evaluators.anomaly:AnomalyEvaluator",
    "knn": "nda_jax.evaluators.knn:KnnEvaluator",
    "classification": "nda_jax.evaluators.classification:ClassificationEvaluator",
    "video_classification": "nda_jax.evaluators.video_classification:VideoClassificationEvaluator",
}


def get_class(type_name: str) -> type:
  if type_name not in REGISTRY:
    raise ValueError(f"unknown evaluator type {type_name!r}; valid types: {sorted(REGISTRY)}")
  module, name = REGISTRY[type_name].split(":")
  return getattr(importlib.import_module(module), name)


def default_config(type_name: str) -> ml_collections.ConfigDict:
  """Every key an evaluator of `type_name` reads, with its default (incl. type and every)."""
  config = get_class(type_name).default_config()
  if config.get("type") != type_name or "every" not in config:
    raise TypeError(f"{REGISTRY[type_name]}.default_config() must declare type={type_name!r} "
                    f"and every")
  return config


def validate(evals_cfg: ml_collections.ConfigDict) -> None:
  """ValueError for an unknown type, or a key its type does not declare (naming close ones)."""
  for name, entry in evals_cfg.items():
    if not isinstance(entry, (ml_collections.ConfigDict, Mapping)) or "type" not in entry:
      raise ValueError(f"config.evals.{name} must be a section with a `type`, one of "
                       f"{sorted(REGISTRY)}")
    if entry["type"] not in REGISTRY:
      raise ValueError(f"config.evals.{name}.type={entry['type']!r} is not an evaluator type"
                       f"{config_lib.did_you_mean(entry['type'], REGISTRY)}; valid types: "
                       f"{sorted(REGISTRY)}")
    declared = default_config(entry["type"])
    for key in entry:
      if key not in declared:
        raise ValueError(f"config.evals.{name}.{key} is not a setting of a {entry['type']!r} "
                         f"evaluator{config_lib.did_you_mean(key, declared)}; its settings: "
                         f"{sorted(declared)}")


def with_defaults(evals_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A validated copy of `evals_cfg` in which every entry has all its type's declared keys."""
  validate(evals_cfg)
  out = ml_collections.ConfigDict()
  for name, entry in evals_cfg.items():
    full = default_config(entry["type"])
    for key, value in entry.items():
      full[key] = value
    out[name] = full
  return out


def build(evals_cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, *,
          workdir: str | None = None, mesh: jax.sharding.Mesh | None = None,
          only: Iterable[str] | None = None) -> dict[str, Any]:
  """{name: evaluator} for the entries of `evals_cfg` (or those named in `only`)."""
  evals = with_defaults(evals_cfg)
  names = list(evals) if only is None else list(dict.fromkeys(only))
  for name in names:
    if name not in evals:
      raise ValueError(f"no evaluator {name!r} in config.evals"
                       f"{config_lib.did_you_mean(name, evals)}; configured: {sorted(evals)}")
  return {name: get_class(evals[name].type)(evals[name], data_cfg, workdir=workdir, mesh=mesh)
          for name in names}
