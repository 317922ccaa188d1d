r"""Evaluate a GAN checkpoint: sample quality (FID / IS / KID, fd_digits) and anomaly AUROC.

  python -m nda_jax.eval --workdir=runs/demo [--checkpoint=best|latest|STEP] \
      [--metrics=fd_digits,anomaly] [--num_samples=1000] [--set=eval.seed=1 ...]

Uses the run's resolved config (WORKDIR/config.json); `--set key=value`
overrides any of its fields for this evaluation (values are Python literals,
e.g. `--set="eval.anomaly.synthetic=['uniform_noise']"`, else strings).
Samples come from G_ema (as in training), D is the trained discriminator.

Writes WORKDIR/eval.json ({"step", "checkpoint", "num_samples", "metrics"}),
TensorBoard scalars `eval/<metric>` at the checkpoint's step (beside the
training curves, also appended to metrics.jsonl) and, for `anomaly`, the
per-set table WORKDIR/anomaly/anomaly.{json,md}. When the run configures no
out-of-distribution set (`eval.anomaly`), `anomaly` scores the in-distribution
test split against its own NDA of that split and the synthetic sets that need
no download (see evaluators/anomaly.py).

From Python (a notebook): `result = eval.run(eval.prepare(workdir, metrics=["fd_digits"]))`.
"""
import ast
from collections.abc import Callable, Mapping, Sequence
import json
import os
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
from jax.sharding import PartitionSpec as P
import ml_collections

from nda_jax import config_lib
from nda_jax import evaluators as evaluators_lib
from nda_jax import parallel
from nda_jax.evaluators import anomaly
from nda_jax.trainers import common
from nda_jax.trainers import gan

TB_PREFIX = "eval/"
_ANOMALY_SETS = ("ndas", "ood_data", "synthetic", "cifar10c_dir")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies 'a.b.c=value' strings in place; missing parents are created (e.g. eval.anomaly)."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"--set={item!r}: expected key=value, e.g. eval.num_samples=1000")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.strip().split(".")
    node = config
    for depth, name in enumerate(parents):
      if name not in node or node[name] is None:
        node[name] = ml_collections.ConfigDict()
      node = node[name]
      if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"--set={item!r}: {'.'.join(parents[:depth + 1])} is a "
                         f"{type(node).__name__}, not a config section")
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"--set={item!r}: {e}") from e


def resolve_metrics(config: ml_collections.ConfigDict,
                    names: Sequence[str] | None) -> tuple[str, ...]:
  """The metrics to compute, validated before any checkpoint or network is loaded."""
  if names is None:
    names = config.eval.get("metrics") or ()
  names = tuple(names)
  valid = sorted(evaluators_lib.valid_metrics())
  if not names:
    raise ValueError(f"no metric to compute: the run's config.eval.metrics is empty; pass "
                     f"--metrics with some of {valid}")
  unknown = sorted(set(names) - set(valid))
  if unknown:
    raise ValueError(f"unknown metric(s) {unknown}; valid choices: {valid}")
  return tuple(dict.fromkeys(names))


def add_default_anomaly_sets(config: ml_collections.ConfigDict) -> None:
  """Without a configured OOD set: the run's own NDA and the download-free synthetic sets.

  An NDA-GAN's D was trained to reject exactly its NDA, so NDA(test) is the
  natural first out-of-distribution set; the synthetic ones show how D ranks
  images unlike anything it saw.
  """
  cfg = config.eval.get("anomaly") or ml_collections.ConfigDict()
  if any(cfg.get(k) for k in _ANOMALY_SETS):
    return
  cfg.ndas = [config.nda.to_dict()]
  cfg.synthetic = sorted(anomaly.SYNTHETIC)
  config.eval.anomaly = cfg
  logging.info("no eval.anomaly sets configured: using NDA %r and synthetic %s",
               config.nda.name, cfg.synthetic)


class Evaluation(NamedTuple):
  """One checkpoint, ready to evaluate."""
  config: ml_collections.ConfigDict
  checkpoint: str
  state: gan.GANState                   # replicated over all devices
  evaluators: list[Any]
  scorer: Callable[..., jax.Array]


def prepare(workdir: str, checkpoint: str | int = "latest",
            metrics: Sequence[str] | None = None, num_samples: int | None = None,
            overrides: Sequence[str] = ()) -> Evaluation:
  """Loads config, checkpoint and evaluators; every user error surfaces here, before any work."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir} does not exist")
  config = config_lib.load_config(workdir)
  apply_overrides(config, overrides)
  if num_samples is not None:
    config.eval.num_samples = num_samples
  names = resolve_metrics(config, metrics)
  if evaluators_lib.ANOMALY in names:
    add_default_anomaly_sets(config)
  state = gan.load_state(config, workdir, checkpoint)   # Clear errors for missing/unknown steps.
  dp = parallel.DataParallel()                          # All devices, the state replicated.
  evaluators = evaluators_lib.build(config, workdir, mesh=dp.mesh, metric_names=names)
  return Evaluation(config, str(checkpoint), dp.put_state(state), evaluators,
                    gan.make_scorer(config, dp))


def run(evaluation: Evaluation) -> dict[str, Any]:
  """{"step", "checkpoint", "num_samples", "metrics": {name: value}}."""
  config, state = evaluation.config, evaluation.state
  values = gan.run_evaluators(evaluation.evaluators, config, state, scorer=evaluation.scorer)
  return {"step": int(jax.device_get(state.step)), "checkpoint": evaluation.checkpoint,
          "num_samples": int(config.eval.num_samples), "metrics": values}


def write_result(workdir: str, result: Mapping[str, Any], out: str | None = None) -> str:
  """eval.json plus `eval/<metric>` scalars at the checkpoint's step (process 0 only)."""
  out = out or os.path.join(workdir, "eval.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
  writer = common.MetricWriter(workdir)
  try:
    writer.write(result["step"], {TB_PREFIX + k: v for k, v in result["metrics"].items()})
  finally:
    writer.close()
  return out


def format_table(result: Mapping[str, Any]) -> str:
  metrics = result["metrics"]
  width = max([len(k) for k in metrics] + [len("metric")])
  lines = [f"checkpoint {result['checkpoint']} (step {result['step']}), "
           f"{result['num_samples']} samples", f"{'metric':<{width}}  value",
           f"{'-' * width}  {'-' * 12}"]
  lines += [f"{k:<{width}}  {v:.6g}" for k, v in sorted(metrics.items())]
  return "\n".join(lines)


def define_flags() -> None:
  """The CLI's flags. Defined only when run as a script: tests and notebooks import
  this module beside other entry points that define --workdir too."""
  flags.DEFINE_string("workdir", None, "Workdir of a run (holds config.json).", required=True)
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
  flags.DEFINE_list("metrics", None, "Metrics to compute (default: config.eval.metrics); e.g. "
                    "fid,is,kid,fd_digits,anomaly.")
  flags.DEFINE_integer("num_samples", None, "Samples per metric (default: "
                       "config.eval.num_samples).")
  flags.DEFINE_multi_string("set", [], "key=value override of the run's config, e.g. "
                            "eval.inception_weights=/path/pt_inception.pth.")
  flags.DEFINE_string("out", None, "Result JSON (default WORKDIR/eval.json).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    evaluation = prepare(f.workdir, f.checkpoint, f.metrics, f.num_samples, f.set)
  except (FileNotFoundError, ValueError) as e:  # Bad flags or workdir: the message, no traceback.
    raise SystemExit(f"nda_jax.eval: error: {e}") from None
  result = run(evaluation)
  out = write_result(f.workdir, result, f.out)
  print(format_table(result))
  print(f"wrote {out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
