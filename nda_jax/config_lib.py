"""Config I/O: the resolved config a run writes to, and reads back from, its workdir."""
from collections.abc import Callable, Iterable
import difflib
import fnmatch
import json

import ml_collections

from nda_jax import workdir as workdir_lib

CONFIG_FILE = "config.json"
HISTORY_DIR = "config_history"
# Keys a resumed run may change without changing how its steps are computed:
# how long it runs, how often it logs, evaluates, samples and saves, and on how
# many devices (the step is device-count independent and resumes exactly).
RESUMABLE_CHANGES = ("train.total_steps", "train.num_epochs", "train.log_every",
                     "sample.every", "evals.*.every", "checkpoint.*", "max_devices",
                     "parallel")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The resolved config, beside the run's checkpoints; a local file is replaced whole
  (a full disk leaves the previous one, not a truncated one; bucket objects are anyway)."""
  path = workdir_lib.path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  text = config.to_json_best_effort(indent=2)
  if not workdir_lib.is_local(workdir):
    path.write_text(text)
    return
  partial = path.with_name(CONFIG_FILE + ".partial")
  try:
    partial.write_text(text)
    partial.replace(path)
  finally:
    if partial.exists():
      partial.unlink()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to its workdir (for eval, sampling, importers)."""
  path = workdir_lib.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not the workdir of a run")
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
    raise ValueError(f"{path} is not a readable config ({type(e).__name__}: {e}): the file is "
                     f"truncated or was edited by hand; restore it from a copy, or write it "
                     f"again by resuming the run with its --config") from None
  if "evals" in config:   # JSON holds lists where the evaluators declare tuples.
    from nda_jax import evaluators  # pylint: disable=g-import-not-at-top  (heavy)
    config.evals = evaluators.with_defaults(config.evals)
  return config


def load_run_config(workdir: str, flag: str, trainer: str, reads: str
                    ) -> ml_collections.ConfigDict:
  """The config.json of the run `flag`=`workdir` names, which must be a `trainer` run
  (ValueError / FileNotFoundError naming the flag; `reads` says what the reader takes)."""
  try:
    config = load_config(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{flag}={workdir}: {e}") from None
  if config.get("trainer") != trainer:
    raise ValueError(f"{flag}={workdir} is a {config.get('trainer')!r} run; {reads}")
  return config


def _leaves(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def training_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
                     ) -> list[tuple[str, object, object]]:
  """(key, saved value, new value) for every key outside RESUMABLE_CHANGES in which
  a resumed run's config differs from the one its checkpoints were trained with."""
  old, new = (_leaves(json.loads(c.to_json_best_effort())) for c in (saved, config))
  missing = object()
  return [(key, old.get(key, missing), new.get(key, missing)) for key in sorted({*old, *new})
          if old.get(key, missing) != new.get(key, missing)
          and not any(fnmatch.fnmatchcase(key, p) for p in RESUMABLE_CHANGES)]


def check_resume_config(config: ml_collections.ConfigDict, workdir: str, step: int,
                        allow_change: bool) -> ml_collections.ConfigDict | None:
  """The saved config to keep in config_history/ when `config` changes how a run
  resumed from `step` trains (with `allow_change`); ValueError listing the changed
  keys without it. None when nothing that matters changed."""
  path = workdir_lib.path(workdir) / CONFIG_FILE
  if not path.exists():
    return None   # Nothing to compare with (checkpoints copied without it).
  load_config(workdir)   # A clear error for a damaged file; compared as written:
  saved = ml_collections.ConfigDict(json.loads(path.read_text()))
  changes = training_changes(saved, config)
  if not changes:
    return None
  if allow_change:
    return saved
  shown = "; ".join(f"{k}: {_shown(a)} -> {_shown(b)}" for k, a, b in changes[:12])
  more = f" (and {len(changes) - 12} more)" if len(changes) > 12 else ""
  raise ValueError(
      f"--workdir={workdir} holds a run trained to step {step} with another config: {shown}"
      f"{more}. Resuming would train its next steps differently from its first, and "
      f"config.json would no longer say how they were trained. Use a new --workdir, resume "
      f"with the run's own config (only {', '.join(RESUMABLE_CHANGES)} may change), or pass "
      f"--allow_config_change to go on with the new config (the old one is kept as "
      f"{HISTORY_DIR}/step_{step}.json).")


def _shown(value) -> str:
  return "(absent)" if not isinstance(value, (str, int, float, bool, list, type(None))) \
      else json.dumps(value)


def write_history(saved: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Keeps the config the steps up to `step` were trained with."""
  path = workdir_lib.path(workdir) / HISTORY_DIR / f"step_{step}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(saved.to_json_best_effort(indent=2))


def did_you_mean(key: str, valid: Iterable[str], shown: Callable[[str], str] = repr) -> str:
  """' (did you mean ...?)' naming the close matches of a mistyped key, or '': the one
  suggestion rule of every "no such key / type / evaluator" message."""
  close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
  return f" (did you mean {' or '.join(shown(c) for c in close)}?)" if close else ""


def _has(node, parts: list[str]) -> bool:
  for part in parts:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def check_overrides(config: ml_collections.ConfigDict, keys: Iterable[str],
                    flag: str = "config") -> None:
  """ValueError for an override `--<flag>.<key>` of a key `config` does not declare: the
  section where the path leaves the config, its keys close to the mistyped part (those that
  have the rest of the path first, with it: a typo in any part is mended) and all its keys."""
  for key in keys:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      section = ".".join([flag, *parts[:depth]])
      if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"--{flag}.{key}: {section} is a {type(node).__name__}, not a section")
      if part not in node:
        rest = ".".join(["", *parts[depth + 1:]])
        having = [k for k in node if _has(node[k], parts[depth + 1:])]
        hint = (did_you_mean(part, having, lambda k: f"--{section}.{k}{rest}") if having
                else "") or did_you_mean(part, node, lambda k: f"--{section}.{k}")
        raise ValueError(f"--{flag}.{key}: {section} has no key {part!r}{hint}; its keys: "
                         f"{sorted(node)}")
      node = node[part]
