r"""Ablation tables from workdirs: runs grouped by their config, seeds as replicates.

  python -m nda_jax.tools.compare runs/gan_nda_s* runs/gan_base_s* [--out=DIR] \
      [--baseline=loss.beta=0] [--metrics='fd_digits,eval/anomaly/*'] [--ignore=KEY,...]

Each run is a workdir: its config.json and its metrics, those logged in
training (metrics.jsonl) and those `nda_jax.eval` wrote (eval_metrics.jsonl,
or eval.json alone; named `eval/<metric>`). Runs are grouped by the config
keys in which they differ, except `seed` (the replicate: runs of one group
with the same seed are refused). A run with `pretrained_workdir` (a linear
probe) is grouped also by its pretrained run's config (`pretrained.<key>`;
its `pretrained.seed` is part of the replicate).

Per metric and group: the final value (the last step's) and the best one
(over the steps, in the metric's direction) as mean ± sd over the seeds
(sample sd, ddof=1; n=1 has none) with n, and the paired difference against
the baseline group over the seeds both have (group - baseline: mean, sd, and
in how many of those seeds the group is better). The baseline is the group
whose differing keys match `--baseline=KEY=VALUE[,...]`; by default the one
group with NDA off (`nda.enabled=False`, `loss.beta=0` with `loss.alpha=1`,
`nda.name=none`). Writes DIR/compare.md, DIR/compare.csv and one PNG per
metric (DIR/<metric>.png: each group's mean over the seeds along the steps,
a band of ± sd) and prints the Markdown.
"""
from collections.abc import Iterable, Mapping, Sequence
import csv
import fnmatch
import io
import json
import math
import os
from typing import Any, NamedTuple

from absl import app
from absl import flags
from etils import epath
import numpy as np

from nda_jax import cli
from nda_jax import logs
from nda_jax import workdir as workdir_lib
from nda_jax.tools import figures

_PROG = "nda_jax.tools.compare"

SEED_KEYS = ("seed", "pretrained.seed")
PRETRAINED_KEY = "pretrained_workdir"
EVAL_PREFIX = "eval/"
EVAL_FILES = ("eval_metrics.jsonl", "eval.json")
TIMING_KEYS = ("img_per_sec", "sec_per_step", "eta_sec")
# Direction by name (the name without `eval/`): fnmatch patterns, first match wins.
DIRECTIONS = (
    ("*_std", None),                   # a spread, not a score
    ("fid", "lower"), ("fid_*", "lower"), ("ifid*", "lower"), ("intra_*", "lower"),
    ("fd_*", "lower"), ("kid", "lower"), ("kid_*", "lower"), ("*loss*", "lower"),
    ("is", "higher"), ("inception_score", "higher"), ("precision*", "higher"),
    ("recall*", "higher"), ("density*", "higher"), ("coverage*", "higher"),
    ("anomaly/*", "higher"), ("*auroc*", "higher"), ("knn*", "higher"), ("*top1", "higher"),
    ("*top5", "higher"),
)
# Baseline markers, checked on a group's differing keys (and `pretrained.` ones).
BASELINE_MARKERS = ({"nda.enabled": False}, {"loss.alpha": 1.0, "loss.beta": 0.0},
                    {"nda.name": "none"})
_MISSING = "<absent>"


def direction(metric: str) -> str | None:
  """'lower', 'higher' or None (unknown: no best value, no 'better' count)."""
  name = metric[len(EVAL_PREFIX):] if metric.startswith(EVAL_PREFIX) else metric
  return next((d for pattern, d in DIRECTIONS if fnmatch.fnmatchcase(name, pattern)), None)


def is_default_metric(metric: str) -> bool:
  name = metric[len(EVAL_PREFIX):] if metric.startswith(EVAL_PREFIX) else metric
  return direction(metric) is not None and not fnmatch.fnmatchcase(name, "*loss*")


# ------------------------------------------------------------------ reading runs
class Run(NamedTuple):
  path: str
  config: dict[str, Any]                           # flat: 'loss.alpha' -> 0.25
  series: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (steps, values)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'loss': {'alpha': 1}} -> {'loss.alpha': 1}; lists become tuples (hashable)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = tuple(value) if isinstance(value, list) else (
          {} if isinstance(value, Mapping) else value)
  return out


def _read_config(workdir: str) -> dict[str, Any]:
  path = workdir_lib.path(workdir) / "config.json"
  if not workdir_lib.path(workdir).is_dir():
    raise ValueError(f"{workdir} is not a folder: pass the workdirs of runs")
  if not path.exists():
    raise ValueError(f"{workdir} has no config.json: is it the workdir of a run "
                     f"(`python -m nda_jax.main ... --workdir={workdir}`)?")
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not JSON ({e}): is it the config.json a run wrote?") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path} holds a {type(config).__name__}, not a run's config")
  return flatten(config)


def _add_records(series: dict[str, dict[int, float]], records: Iterable[Mapping[str, Any]],
                 prefix: str = "") -> None:
  for record in records:
    for key, value in record.items():
      if key == "step" or key in TIMING_KEYS or not isinstance(value, (int, float)):
        continue
      series.setdefault(prefix + key, {})[int(record["step"])] = float(value)   # last wins


def read_run(workdir: str) -> Run:
  """A workdir's flat config (with its pretrained run's) and metric series."""
  config = _read_config(workdir)
  pretrained = config.pop(PRETRAINED_KEY, None)
  if pretrained:
    if not os.path.isabs(pretrained) and not workdir_lib.path(pretrained).exists():
      pretrained = os.path.join(workdir, pretrained)
    config.update({f"pretrained.{k}": v for k, v in _read_config(pretrained).items()
                   if k != PRETRAINED_KEY})
  series: dict[str, dict[int, float]] = {}
  root = workdir_lib.path(workdir)
  if (root / logs.METRICS_FILE).exists():
    _add_records(series, logs.read_metrics(workdir))
  if (root / EVAL_FILES[0]).exists():
    records = [{k[len(EVAL_PREFIX):] if k.startswith(EVAL_PREFIX) else k: v
                for k, v in r.items()} for r in logs.read_metrics(workdir, EVAL_FILES[0])]
    _add_records(series, records, EVAL_PREFIX)
  elif (root / EVAL_FILES[1]).exists():
    try:
      result = json.loads((root / EVAL_FILES[1]).read_text())
      _add_records(series, [{"step": result["step"], **result["metrics"]}], EVAL_PREFIX)
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ValueError(f"{root / EVAL_FILES[1]} is not the eval.json `nda_jax.eval` "
                       f"writes") from None
  if not series:
    raise ValueError(f"{workdir} has no metrics ({logs.METRICS_FILE}, {EVAL_FILES[0]} or "
                     f"{EVAL_FILES[1]}): has the run logged or been evaluated yet?")
  return Run(str(workdir), config, {
      k: (np.asarray(sorted(v)), np.asarray([v[s] for s in sorted(v)], np.float64))
      for k, v in series.items()})


# ------------------------------------------------------------------ groups
class Group(NamedTuple):
  label: str                      # 'loss.alpha=0.25, loss.beta=0.75'
  keys: dict[str, Any]            # its values of the differing keys
  runs: dict[tuple, Run]          # replicate (seed values) -> run


def _format_value(value: Any) -> str:
  return value if isinstance(value, str) else json.dumps(value)


def _replicate(run: Run) -> tuple:
  return tuple(run.config.get(k, _MISSING) for k in SEED_KEYS)


def replicate_name(replicate: tuple) -> str:
  return "/".join(str(v) for v in replicate if v != _MISSING) or "-"


def group_runs(runs: Sequence[Run], ignore: Iterable[str] = ()) -> tuple[list[str], list[Group]]:
  """(the differing keys, the groups in the order of their first run)."""
  skip = set(SEED_KEYS) | set(ignore)
  keys = sorted({k for r in runs for k in r.config} - skip)
  differing = [k for k in keys
               if len({_format_value(r.config.get(k, _MISSING)) for r in runs}) > 1]
  groups: dict[tuple, Group] = {}
  for run in runs:
    values = {k: run.config.get(k, _MISSING) for k in differing}
    ident = tuple(_format_value(v) for v in values.values())
    label = ", ".join(f"{k}={_format_value(v)}" for k, v in values.items()) or "all runs"
    group = groups.setdefault(ident, Group(label, values, {}))
    replicate = _replicate(run)
    if replicate in group.runs:
      raise ValueError(f"{group.runs[replicate].path} and {run.path} have the same config and "
                       f"seed ({replicate_name(replicate)}): pass each run once, or --ignore "
                       f"the keys that should not make groups")
    group.runs[replicate] = run
  return differing, list(groups.values())


def _matches(value: Any, wanted: Any) -> bool:
  if isinstance(value, bool) or isinstance(wanted, bool):
    return value is wanted or (isinstance(wanted, str) and str(value).lower() == wanted.lower())
  if isinstance(value, (int, float)) and isinstance(wanted, (int, float)):
    return float(value) == float(wanted)
  return _format_value(value) == _format_value(wanted)


def parse_baseline(pairs: Sequence[str]) -> dict[str, Any]:
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key:
      raise ValueError(f"--baseline={pair}: write KEY=VALUE, e.g. --baseline=nda.enabled=false")
    try:
      out[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def find_baseline(groups: Sequence[Group], differing: Sequence[str],
                  wanted: Mapping[str, Any] | None) -> tuple[int | None, str]:
  """(index of the baseline group or None, how it was chosen)."""
  if len(groups) < 2:
    return None, "one group: no baseline"
  if wanted:
    unknown = [k for k in wanted if k not in differing]
    if unknown:
      raise ValueError(f"--baseline: {unknown} not among the keys in which the runs differ: "
                       f"{list(differing)}")
    hits = [i for i, g in enumerate(groups)
            if all(_matches(g.keys[k], v) for k, v in wanted.items())]
    if len(hits) != 1:
      raise ValueError(f"--baseline={','.join(f'{k}={v}' for k, v in wanted.items())} matches "
                       f"{len(hits)} groups; the groups: {[g.label for g in groups]}")
    return hits[0], "--baseline"
  hits = set()
  for i, group in enumerate(groups):
    for marker in BASELINE_MARKERS:
      for prefix in ("", "pretrained."):
        marked = {prefix + k: v for k, v in marker.items()}
        if any(k in group.keys for k in marked) and all(
            _matches(group.keys.get(k, run_value(group, k)), v) for k, v in marked.items()):
          hits.add(i)
  if len(hits) == 1:
    return hits.pop(), "NDA off"
  return None, ("no group is the only one with NDA off: pass --baseline=KEY=VALUE for "
                "paired differences")


def run_value(group: Group, key: str) -> Any:
  """A key's value in the group's runs (the same in all of them when it does not differ)."""
  return next(iter(group.runs.values())).config.get(key, _MISSING)


# ------------------------------------------------------------------ statistics
def final_and_best(steps_values: tuple[np.ndarray, np.ndarray], way: str | None
                   ) -> tuple[float, float]:
  values = steps_values[1]
  best = {"lower": np.min, "higher": np.max}.get(way)
  return float(values[-1]), float(best(values)) if best else math.nan


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
  values = np.asarray(values, np.float64)
  if not len(values):
    return math.nan, math.nan, 0
  sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
  return float(np.mean(values)), sd, len(values)


class Row(NamedTuple):
  metric: str
  direction: str | None
  group: str
  seeds: list[str]
  final: tuple[float, float, int]
  best: tuple[float, float, int]
  diff_final: tuple[float, float, int, int] | None  # mean, sd, n paired, n better
  diff_best: tuple[float, float, int, int] | None


def _paired(mine: Mapping[tuple, float], base: Mapping[tuple, float], way: str | None
            ) -> tuple[float, float, int, int]:
  common_seeds = [s for s in mine if s in base]
  diffs = np.asarray([mine[s] - base[s] for s in common_seeds], np.float64)
  mean, sd, n = mean_sd(diffs)
  better = {"lower": int(np.sum(diffs < 0)), "higher": int(np.sum(diffs > 0))}.get(way, -1)
  return mean, sd, n, better


def table(groups: Sequence[Group], baseline: int | None, metrics: Sequence[str]) -> list[Row]:
  rows = []
  for metric in metrics:
    way = direction(metric)
    per_group = []
    for group in groups:
      finals, bests = {}, {}
      for replicate, run in group.runs.items():
        if metric in run.series:
          finals[replicate], bests[replicate] = final_and_best(run.series[metric], way)
      per_group.append((finals, bests))
    for i, (group, (finals, bests)) in enumerate(zip(groups, per_group)):
      if not finals:
        continue
      diffs = (None, None)
      if baseline is not None and i != baseline and per_group[baseline][0]:
        diffs = (_paired(finals, per_group[baseline][0], way),
                 _paired(bests, per_group[baseline][1], way) if way else None)
      rows.append(Row(metric, way, group.label, [replicate_name(s) for s in finals],
                      mean_sd(list(finals.values())),
                      mean_sd(list(bests.values())) if way else (math.nan, math.nan, 0),
                      *diffs))
  return rows


# ------------------------------------------------------------------ output
def _pm(mean: float, sd: float) -> str:
  if math.isnan(mean):
    return "–"
  return f"{mean:.4g}" if math.isnan(sd) else f"{mean:.4g} ± {sd:.2g}"


def _diff(d: tuple[float, float, int, int] | None) -> str:
  if d is None or not d[2]:
    return "–"
  better = f", better in {d[3]}/{d[2]}" if d[3] >= 0 else ""
  return f"{_pm(d[0], d[1])} (n={d[2]}{better})"


def markdown(rows: Sequence[Row], groups: Sequence[Group], baseline: int | None,
             baseline_note: str, differing: Sequence[str]) -> str:
  lines = ["Groups (runs differ in: " + (", ".join(differing) or "nothing but the seed") + "):", ""]
  for i, group in enumerate(groups):
    mark = " **(baseline)**" if i == baseline else ""
    seeds = ", ".join(replicate_name(s) for s in group.runs)
    lines.append(f"- {group.label}{mark}: seeds {seeds}")
  if baseline is None:
    lines += ["", f"No paired differences: {baseline_note}."]
  else:
    lines += ["", f"Baseline ({baseline_note}): {groups[baseline].label}. Δ = group − baseline "
              f"over the seeds both have; mean ± sd over seeds (sd: ddof=1)."]
  lines += ["", "| metric | group | n | final | best | Δ final | Δ best |",
            "|---|---|---|---|---|---|---|"]
  for r in rows:
    arrow = {"lower": " ↓", "higher": " ↑"}.get(r.direction, "")
    lines.append(f"| {r.metric}{arrow} | {r.group} | {r.final[2]} | {_pm(*r.final[:2])} | "
                 f"{_pm(*r.best[:2])} | {_diff(r.diff_final)} | {_diff(r.diff_best)} |")
  return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Row]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["metric", "direction", "group", "seeds", "n", "final_mean", "final_sd",
                   "best_mean", "best_sd", "diff_final_mean", "diff_final_sd", "diff_final_n",
                   "diff_final_better", "diff_best_mean", "diff_best_sd", "diff_best_n",
                   "diff_best_better"])
  none = ("", "", "", "")
  for r in rows:
    diff = lambda d: none if d is None else (*d[:3], d[3] if d[3] >= 0 else "")
    writer.writerow([r.metric, r.direction or "", r.group, " ".join(r.seeds), r.final[2],
                     *r.final[:2], *r.best[:2], *diff(r.diff_final), *diff(r.diff_best)])
  return buffer.getvalue()


def curve(group: Group, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps every seed of the group has, mean, sd over the seeds (0 for one seed))."""
  series = [run.series[metric] for run in group.runs.values() if metric in run.series]
  steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in series)))
  values = np.asarray([v[np.searchsorted(s, steps)] for s, v in series])
  sd = np.std(values, axis=0, ddof=1) if len(series) > 1 else np.zeros(len(steps))
  return np.asarray(steps), values.mean(axis=0), sd


def plot(groups: Sequence[Group], metric: str, out: epath.Path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (figures sets Agg)
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for group in groups:
    if not any(metric in r.series for r in group.runs.values()):
      continue
    steps, mean, sd = curve(group, metric)
    n = sum(metric in r.series for r in group.runs.values())
    label = f"{group.label} (n={n})"
    if len(steps) == 1:
      ax.errorbar(steps, mean, yerr=sd, fmt="o", capsize=4, label=label)
    else:
      line, = ax.plot(steps, mean, marker=".", label=label)
      ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
  ax.set_title(f"{metric} ({direction(metric) or '?'} is better), mean ± sd over seeds",
               fontsize=9)
  ax.set_xlabel("step")
  ax.legend(fontsize=7)
  fig.tight_layout()
  figures.save_figure(fig, out)


def png_name(metric: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in metric) + ".png"


def compare(workdirs: Sequence[str], out: str | None, baseline: Sequence[str] | None = None,
            metric_patterns: Sequence[str] | None = None, ignore: Sequence[str] = ()
            ) -> tuple[str, list[Row]]:
  """Reads, groups, tabulates; writes OUT/compare.{md,csv} and the PNGs (out=None: nothing)."""
  if not workdirs:
    raise ValueError("no runs given: pass the workdirs of the runs to compare, e.g. "
                     "`python -m nda_jax.tools.compare runs/nda_s* runs/base_s*`")
  runs = [read_run(w) for w in dict.fromkeys(workdirs)]
  differing, groups = group_runs(runs, ignore)
  index, note = find_baseline(groups, differing, parse_baseline(baseline or ()))
  names = sorted({m for r in runs for m in r.series})
  if metric_patterns:
    metrics = [m for m in names if any(fnmatch.fnmatchcase(m, p) for p in metric_patterns)]
  else:
    metrics = [m for m in names if is_default_metric(m)]
  if not metrics:
    raise ValueError(f"no metric to compare (--metrics={','.join(metric_patterns or [])}); "
                     f"the runs log: {names}")
  rows = table(groups, index, metrics)
  text = markdown(rows, groups, index, note, differing)
  if out:
    folder = epath.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.md").write_text(text)
    (folder / "compare.csv").write_text(csv_text(rows))
    for metric in metrics:
      plot(groups, metric, folder / png_name(metric))
  return text, rows


def _parse(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(_PROG, str(e))


def define_flags() -> None:
  """The CLI's flags, defined only when run as a script (see nda_jax.eval.define_flags)."""
  flags.DEFINE_string("out", "compare", "Output folder of compare.md, compare.csv and "
                      "the PNGs.")
  flags.DEFINE_list("baseline", None, "KEY=VALUE pairs that pick the baseline group "
                    "(default: the group with NDA off).")
  flags.DEFINE_list("metrics", None, "Metrics to compare, fnmatch patterns (default: "
                    "every evaluation metric, those with a known direction, not losses).")
  flags.DEFINE_list("ignore", [], "Config keys that do not make groups (beside seed).")


def main(argv):
  f = flags.FLAGS
  try:
    text, _ = compare(argv[1:], f.out, f.baseline, f.metrics, f.ignore)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(_PROG, str(e))
  print(text)
  print(f"wrote {f.out}/compare.md, compare.csv and a PNG per metric")


if __name__ == "__main__":
  define_flags()
  app.run(cli.guard(main, _PROG), flags_parser=_parse)
