"""tools.compare on workdirs made here: known metrics, tables computed by hand and with NumPy."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nda_jax.tools import compare

# seed -> fd_digits at steps 10, 20 (lower is better) and the eval AUROC (higher is better).
NDA = {0: ([15.0, 20.0], 0.9), 1: ([25.0, 22.0], 0.8), 2: ([40.0, 18.0], 0.7)}
BASE = {0: ([30.0, 26.0], 0.5), 1: ([28.0, 21.0], 0.6), 3: ([35.0, 30.0], 0.4)}
AUROC = "eval/anomaly/nda/jigsaw"


def _config(seed: int, alpha: float, beta: float) -> dict:
  return {"trainer": "gan", "seed": seed, "loss": {"kind": "hinge", "alpha": alpha, "beta": beta},
          "evals": {"fd_digits": {"type": "sample_quality", "metrics": ["fd_digits"]}},
          "train": {"total_steps": 20}}


def _write_run(path, config, records, eval_records=()):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  if eval_records:
    with open(os.path.join(path, "eval_metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in eval_records)
  return str(path)


@pytest.fixture
def runs(tmp_path):
  out = []
  for name, table, alpha, beta in (("nda", NDA, 0.25, 0.75), ("base", BASE, 1.0, 0.0)):
    for seed, (fd, auroc) in table.items():
      records = [{"step": 5, "d_loss": 1.0 + seed, "img_per_sec": 100.0}]
      records += [{"step": s, "fd_digits": v} for s, v in zip((10, 20), fd)]
      # eval run twice at step 20: the later record is the one that counts.
      evals = [{"step": 20, AUROC: 0.0}, {"step": 20, AUROC: auroc}]
      out.append(_write_run(tmp_path / f"{name}_s{seed}", _config(seed, alpha, beta), records,
                            evals))
  return out


def _rows(rows):
  return {(r.metric, r.group): r for r in rows}


def test_groups_by_the_differing_keys_and_pairs_by_seed(runs, tmp_path):
  text, rows = compare.compare(runs, str(tmp_path / "out"))
  by = _rows(rows)
  nda, base = "loss.alpha=0.25, loss.beta=0.75", "loss.alpha=1.0, loss.beta=0.0"
  assert sorted(by) == sorted([("fd_digits", nda), ("fd_digits", base), (AUROC, nda),
                               (AUROC, base)])   # d_loss and img_per_sec are not compared
  # fd_digits, NDA: finals 20, 22, 18; bests (min) 15, 22, 18.
  r = by[("fd_digits", nda)]
  assert r.final[:3] == pytest.approx((20.0, 2.0, 3))
  assert r.best[:3] == pytest.approx((np.mean([15, 22, 18]), np.std([15, 22, 18], ddof=1), 3))
  # Paired on seeds 0 and 1 (the baseline has 0, 1, 3): finals 20-26, 22-21 -> -6, +1.
  assert r.diff_final == pytest.approx((-2.5, np.std([-6.0, 1.0], ddof=1), 2, 1))
  # Bests 15-26, 22-21 -> -11, +1.
  assert r.diff_best == pytest.approx((-5.0, np.std([-11.0, 1.0], ddof=1), 2, 1))
  b = by[("fd_digits", base)]
  assert b.final[:3] == pytest.approx((np.mean([26, 21, 30]), np.std([26, 21, 30], ddof=1), 3))
  assert b.diff_final is None and b.seeds == ["0", "1", "3"]
  # AUROC, higher is better: 0.9-0.5, 0.8-0.6 -> +0.4, +0.2, better in both.
  a = by[(AUROC, nda)]
  assert a.final[:2] == pytest.approx((0.8, 0.1))
  assert a.diff_final == pytest.approx((0.3, np.std([0.4, 0.2], ddof=1), 2, 2))
  assert f"| fd_digits ↓ | {nda} | 3 | 20 ± 2 | 18.33 ± 3.5 | -2.5 ± 4.9 (n=2, better in 1/2)" \
      in text
  assert f"- {base} **(baseline)**: seeds 0, 1, 3" in text

  with open(tmp_path / "out" / "compare.csv") as f:
    table = {(r["metric"], r["group"]): r for r in csv.DictReader(f)}
  assert float(table[(AUROC, nda)]["diff_final_mean"]) == pytest.approx(0.3)
  assert table[(AUROC, nda)]["diff_final_better"] == "2"
  assert table[("fd_digits", base)]["diff_final_mean"] == ""
  for name in ("fd_digits.png", "eval_anomaly_nda_jigsaw.png"):
    assert Image.open(tmp_path / "out" / name).size[0] > 100


def test_curve_is_the_mean_and_sd_over_seeds(runs):
  _, groups = compare.group_runs([compare.read_run(r) for r in runs])
  steps, mean, sd = compare.curve(groups[0], "fd_digits")
  values = np.array([NDA[s][0] for s in (0, 1, 2)])
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_allclose(mean, values.mean(0))
  np.testing.assert_allclose(sd, values.std(0, ddof=1))


def test_metric_patterns_and_explicit_baseline(runs):
  # d_loss on request (lower is better); the NDA group as the baseline.
  _, rows = compare.compare(runs, None, baseline=["loss.beta=0.75"], metric_patterns=["d_*"])
  by = _rows(rows)
  r = by[("d_loss", "loss.alpha=1.0, loss.beta=0.0")]
  # d_loss = 1 + seed at one step: seeds 0, 1 paired -> 0, 0, never strictly better.
  assert r.final[:3] == pytest.approx((np.mean([1, 2, 4]), np.std([1, 2, 4], ddof=1), 3))
  assert r.diff_final == pytest.approx((0.0, 0.0, 2, 0))


def test_eval_json_alone_and_probes_grouped_by_their_pretrained_run(tmp_path):
  probes = []
  for nda_on in (True, False):
    for seed in (0, 1):
      pre = _write_run(tmp_path / f"moco_{nda_on}_{seed}",
                       {"trainer": "moco", "seed": seed, "nda": {"enabled": nda_on}},
                       [{"step": 4, "knn_top1": 0.5}])
      probe = tmp_path / f"probe_{nda_on}_{seed}"
      probes.append(_write_run(probe, {"trainer": "linear_probe", "seed": 0,
                                       "pretrained_workdir": pre}, []))
      with open(probe / "eval.json", "w") as f:
        json.dump({"step": 7, "metrics": {"test_top1": 0.6 + 0.1 * nda_on + 0.01 * seed}}, f)
  text, rows = compare.compare(probes, None)
  by = _rows(rows)
  r = by[("eval/test_top1", "pretrained.nda.enabled=true")]
  assert r.seeds == ["0/0", "0/1"]
  assert r.diff_final == pytest.approx((0.1, 0.0, 2, 2))
  assert "- pretrained.nda.enabled=false **(baseline)**" in text


def test_no_baseline_without_a_marker(tmp_path):
  runs = [_write_run(tmp_path / f"r{lr}", {"seed": 0, "optim": {"lr": lr}},
                     [{"step": 1, "fid": lr}]) for lr in (1, 2)]
  text, rows = compare.compare(runs, None)
  assert all(r.diff_final is None for r in rows)
  assert "pass --baseline=KEY=VALUE" in text


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "nda_jax.tools.compare", *args],
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_the_tables(runs, tmp_path):
  proc = _cli(*runs, f"--out={tmp_path / 'cli'}")
  assert proc.returncode == 0, proc.stderr
  assert "| fd_digits ↓ |" in proc.stdout
  assert sorted(os.listdir(tmp_path / "cli")) == ["compare.csv", "compare.md",
                                                   "eval_anomaly_nda_jigsaw.png", "fd_digits.png"]


@pytest.mark.parametrize("case, match", [
    ("none", "no runs given"),
    ("no_config", "has no config.json"),
    ("missing", "is not a folder"),
    ("same_seed", "have the same config and seed"),
    ("bad_baseline", "not among the keys in which the runs differ"),
    ("no_metric", "no metric to compare"),
])
def test_bad_input_is_one_paragraph(runs, tmp_path, case, match):
  empty = tmp_path / "empty"
  empty.mkdir()
  args = {"none": [],
          "no_config": [runs[0], str(empty)],
          "missing": [str(tmp_path / "nope")],
          "same_seed": [runs[0], str(tmp_path / "copy")],
          "bad_baseline": [*runs, "--baseline=nda.name=none"],
          "no_metric": [*runs, "--metrics=xyz*"]}[case]
  if case == "same_seed":
    _write_run(tmp_path / "copy", _config(0, 0.25, 0.75), [{"step": 1, "fd_digits": 1.0}])
  before = sorted(os.listdir(tmp_path))
  proc = _cli(*args, f"--out={tmp_path / 'never'}")
  assert proc.returncode == 1
  assert proc.stderr.startswith("nda_jax.tools.compare: error: ") and match in proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
  assert sorted(os.listdir(tmp_path)) == before
