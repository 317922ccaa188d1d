r"""Evaluate a run's checkpoint with the evaluators of its config (`config.evals`).

  python -m nda_jax.eval --workdir=runs/demo [--checkpoint=latest|best|STEP] \
      [--only=fd_digits,anomaly] [--config.evals.fd_digits.num_samples=1000 ...]
  python -m nda_jax.eval --workdir=runs/demo --add=anomaly \
      [--config.evals.anomaly.ndas="('jigsaw', 'cutout')"]

The run's config (WORKDIR/config.json, brought up to date by
`config_lib.load_config`: a run from before `config.evals` evaluates too) is
the `--config` flag's value, locked: `--config.<key>=value` overrides a key it
declares, for this evaluation only, and a key it does not declare is an error
that names the close ones. Values are parsed as the key's type (tuples as
`--config.evals.anomaly.synthetic="('uniform_noise',)"`); a key that is None in
config.json (e.g. `data.data_dir`) takes a string.

`--only` picks evaluators by their name in config.evals (default: all).
`--add=TYPE[,TYPE]` evaluates a registered evaluator type (`anomaly`, `knn`,
...; see `evaluators.REGISTRY`) that the run's config does not declare: an
entry `evals.<TYPE>` with the type's declared defaults joins the config for
this evaluation only (config.json is not changed; `--config.evals.<TYPE>.<key>`
overrides it), and only the added evaluators run (with those of `--only`). A
type the config already declares under that name runs as declared, as with
`--only=<TYPE>`. An `anomaly` evaluator with no out-of-distribution set
configured (as `--add=anomaly` adds it) scores the run's own NDA of the test
split and the synthetic sets that need no download (see evaluators/anomaly.py).

Writes WORKDIR/eval.json ({"step", "checkpoint", "evals": the configs used,
"metrics"}), the record `eval/<metric>` at the checkpoint's step appended to
WORKDIR/eval_metrics.jsonl and as TensorBoard scalars in WORKDIR/tensorboard/eval
(beside the training curves) and, for `anomaly`, the per-set table
WORKDIR/anomaly/anomaly.{json,md}. It never writes the training run's own
files (metrics.jsonl, checkpoints), and moves or deletes nothing: it may run
while the run trains.

From Python (a notebook): `result = eval.run(eval.prepare(workdir, only=["fd_digits"]))`;
`parse_config(workdir, ["--config.evals.fd_digits.num_samples=100"])` applies
overrides as the command line does.
"""
from collections.abc import Callable, Mapping, Sequence
import functools
import json
import sys
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from nda_jax import cli
from nda_jax import config_lib
from nda_jax import evaluators as evaluators_lib
from nda_jax import logs
from nda_jax import parallel
from nda_jax import workdir as workdir_lib
from nda_jax.evaluators import anomaly

TB_PREFIX = "eval/"
METRICS_FILE = "eval_metrics.jsonl"
TENSORBOARD_DIR = "tensorboard/eval"
CONFIG_FLAG = "config"
_PROG = "nda_jax.eval"


# ------------------------------------------------------------------ the run's config, overridden
def add_evaluators(config: ml_collections.ConfigDict, types: Sequence[str]
                   ) -> tuple[list[str], list[str]]:
  """Adds `evals.<type>` with the type's declared defaults for each type the config lacks.

  Returns (the names to run, those the config already declared). ValueError
  for a type that is not registered.
  """
  names, declared = [], []
  for type_name in dict.fromkeys(t.strip() for t in types if t.strip()):
    if type_name in config.evals:
      declared.append(type_name)
    elif type_name not in evaluators_lib.REGISTRY:
      raise ValueError(f"--add={type_name}: not a registered evaluator type"
                       f"{config_lib.did_you_mean(type_name, evaluators_lib.REGISTRY)}; "
                       f"registered: {sorted(evaluators_lib.REGISTRY)} (evaluators/__init__.py)")
    else:
      config.evals[type_name] = evaluators_lib.default_config(type_name)
    names.append(type_name)
  return names, declared


def _check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
  """ValueError for an override of a key the config does not declare, naming the close ones.

  A None leaf of config.json (its type lost in JSON) becomes a str-typed
  field, so that it can be overridden at all.
  """
  keys = cli.override_keys(argv, CONFIG_FLAG)
  config_lib.check_overrides(config, keys, flag=CONFIG_FLAG)
  for key in keys:
    *path, leaf = key.split(".")
    node = functools.reduce(lambda section, part: section[part], path, config)
    if node[leaf] is None and node.get_type(leaf) is type(None):
      node[leaf] = ml_collections.FieldReference(None, field_type=str)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, brought up to date; FileNotFoundError if it is not a run."""
  if not workdir_lib.path(workdir).is_dir():
    raise FileNotFoundError(f"--workdir={workdir} does not exist")
  config = config_lib.load_config(workdir)
  if "evals" not in config:
    config.evals = ml_collections.ConfigDict()
  return config


def define_config_flag(config: ml_collections.ConfigDict, argv: Sequence[str],
                       flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`--config` (locked) with `config` as its value; its overrides are checked first."""
  _check_overrides(config, argv)
  try:
    config_flags.DEFINE_config_dict(CONFIG_FLAG, config, "The run's config (config.json).",
                                    flag_values=flag_values, lock_config=True,
                                    sys_argv=list(argv))
  except flags.Error as e:      # e.g. a field whose type cannot be set from the command line
    raise ValueError(str(e)) from None


def parse_config(workdir: str, overrides: Sequence[str] = (), add: Sequence[str] = ()
                 ) -> ml_collections.ConfigDict:
  """The run's config with the evaluators of `add` (as `--add`) and `--config.<key>=value`
  overrides, as on the command line."""
  config = load_run_config(workdir)
  add_evaluators(config, add)
  argv = [_PROG, *overrides]
  flag_values = flags.FlagValues()
  define_config_flag(config, argv, flag_values)
  try:
    flag_values(argv)
  except flags.Error as e:
    raise ValueError(str(e)) from None
  return flag_values[CONFIG_FLAG].value


# ------------------------------------------------------------------ evaluation
class Evaluation(NamedTuple):
  """One checkpoint, ready to evaluate."""
  config: ml_collections.ConfigDict
  checkpoint: str
  step: int
  evaluators: dict[str, Any]
  fns: dict[str, Callable[..., Any]]    # the method's eval callables, state bound


def resolve_names(config: ml_collections.ConfigDict, only: Sequence[str] | None) -> list[str]:
  """The evaluators to run, validated before any checkpoint or network is loaded."""
  evaluators_lib.validate(config.evals)
  names = list(config.evals) if only is None else list(dict.fromkeys(only))
  if not names:
    raise ValueError("nothing to evaluate: the run's config.evals is empty")
  for name in names:
    if name not in config.evals:
      raise ValueError(f"--only: no evaluator {name!r} in the run's config.evals"
                       f"{config_lib.did_you_mean(name, config.evals)}; configured: "
                       f"{sorted(config.evals)}")
  return names


def prepare(workdir: str, checkpoint: str | int = "latest", only: Sequence[str] | None = None,
            config: ml_collections.ConfigDict | None = None, add: Sequence[str] = ()
            ) -> Evaluation:
  """Loads config, checkpoint and evaluators; every user error surfaces here, before any work.

  `add`: evaluator types to add (as `--add`); then only they and those of `only` run.
  """
  from nda_jax import trainers  # pylint: disable=g-import-not-at-top  (heavy)
  config = config if config is not None else load_run_config(workdir)
  if add:
    added, _ = add_evaluators(config, add)
    only = list(dict.fromkeys([*(only or ()), *added]))
  # A run without the checkpoint asked for is the first thing to say.
  trainers.read_checkpoint(config, workdir, checkpoint, lambda ckpt, step: step)
  names = resolve_names(config, only)
  for name in names:
    entry = config.evals[name]
    if entry.type == "anomaly" and anomaly.with_default_sets(
        entry, config.nda if "nda" in config else None):
      logging.info("evals.%s configures no OOD set: using %s and synthetic %s", name,
                   list(entry.ndas), list(entry.synthetic))
  config, method, state = trainers.load_run(workdir, checkpoint, config=config)
  dp = parallel.DataParallel()                          # All devices, the state replicated.
  evaluators = evaluators_lib.build(config.evals, config.data, workdir=workdir, mesh=dp.mesh,
                                    only=names)
  fns = method.make_eval_fns(dp)
  for name, evaluator in evaluators.items():
    missing = sorted(set(evaluator.requires) - set(fns))
    if missing:
      raise ValueError(f"evaluator {name!r} needs {missing}; trainer {config.trainer!r} "
                       f"provides {sorted(fns)}")
  state = dp.put_state(state)
  return Evaluation(config, str(checkpoint), int(jax.device_get(state.step)), evaluators,
                    {k: functools.partial(fn, state) for k, fn in fns.items()})


def run(evaluation: Evaluation) -> dict[str, Any]:
  """{"step", "checkpoint", "evals": {name: its config}, "metrics": {metric: value}}."""
  metrics = {}
  for evaluator in evaluation.evaluators.values():
    for metric, value in evaluator.run(**{k: evaluation.fns[k] for k in evaluator.requires}):
      metrics[metric] = float(value)
  evals = {name: evaluation.config.evals[name].to_dict() for name in evaluation.evaluators}
  return {"step": evaluation.step, "checkpoint": evaluation.checkpoint,
          "evals": json.loads(json.dumps(evals)), "metrics": metrics}


def write_result(workdir: str, result: Mapping[str, Any], out: str | None = None) -> str:
  """eval.json plus `eval/<metric>` records at the checkpoint's step in eval_metrics.jsonl and
  TensorBoard (process 0 only)."""
  path = workdir_lib.path(out or workdir_lib.path(workdir) / "eval.json")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  writer = logs.MetricWriter(workdir, METRICS_FILE, TENSORBOARD_DIR)
  try:
    writer.write(result["step"], {TB_PREFIX + k: v for k, v in result["metrics"].items()})
  finally:
    writer.close()
  return str(path)


def format_table(result: Mapping[str, Any]) -> str:
  metrics = result["metrics"]
  width = max([len(k) for k in metrics] + [len("metric")])
  lines = [f"checkpoint {result['checkpoint']} (step {result['step']}): "
           f"{', '.join(sorted(result['evals']))}", f"{'metric':<{width}}  value",
           f"{'-' * width}  {'-' * 12}"]
  lines += [f"{k:<{width}}  {v:.6g}" for k, v in sorted(metrics.items())]
  return "\n".join(lines)


# ------------------------------------------------------------------ command line
def define_flags(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
  """The CLI's flags. Defined only when run as a script: tests and notebooks import
  this module beside other entry points that define --workdir too."""
  flags.DEFINE_string("workdir", None, "Workdir of a run (holds config.json).")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
  flags.DEFINE_list("only", None, "Evaluators to run, by their name in config.evals "
                    "(default: all).")
  flags.DEFINE_list("add", None, "Registered evaluator types to run on this run although its "
                    "config does not declare them (e.g. anomaly): added as evals.<type> with "
                    "the type's defaults, for this evaluation only; then only they (and "
                    "--only's) run.")
  flags.DEFINE_string("out", None, "Result JSON (default WORKDIR/eval.json).")
  define_config_flag(config, argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    evaluation = prepare(f.workdir, f.checkpoint, f.only, f[CONFIG_FLAG].value, f.add or ())
  except (FileNotFoundError, ValueError) as e:  # Bad flags or workdir: the message, no traceback.
    raise SystemExit(f"{_PROG}: error: {e}") from None
  result = run(evaluation)
  out = write_result(f.workdir, result, f.out)
  print(format_table(result))
  print(f"wrote {out}")


def _cli() -> None:
  workdir = cli.flag_value(sys.argv, "workdir")
  if not workdir:
    sys.exit(f"{_PROG}: error: --workdir=DIR (a run's workdir) is required")
  try:
    add = (cli.flag_value(sys.argv, "add") or "").split(",")
    config = load_run_config(workdir)
    # Before the config flag is defined: its overrides may name the added entries.
    for name in add_evaluators(config, add)[1]:
      print(f"{_PROG}: --add={name}: the run's config declares evals.{name}; it runs as "
            f"declared (as --only={name} would)", file=sys.stderr)
    cli.guard(lambda argv: define_flags(config, argv), _PROG)(sys.argv)
  except (FileNotFoundError, ValueError) as e:
    print(f"{_PROG}: error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(cli.guard(main, _PROG))


if __name__ == "__main__":
  _cli()
