"""A user's mistake ends in one paragraph that says what to do: no traceback, a non-zero
exit status, nothing in an existing workdir overwritten.

Every case runs the real command line (`python -m ...`) in a subprocess, against a run
workdir made once for the module (config.json, a step-2 checkpoint with its pipeline
position, metrics.jsonl). The cases run a few at a time; each test then checks one.
"""
from concurrent import futures
import contextlib
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from nda_jax import config_lib
from nda_jax import trainers
from nda_jax.data import pipeline
from nda_jax.trainers import common
from nda_jax.trainers import gan
from test_gan_trainer import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240   # A case that does not fail starts training (minutes to compile): a failure.

MAIN = ("nda_jax.main", "--config=configs/demo.py:tiny", "--workdir={W}")
SAMPLE = ("nda_jax.sample", "--workdir={W}", "--out={T}/s.png")

# (id, command, a fragment the message must hold). {W}: the run's workdir; {C}: a folder
# with the run's config.json but no checkpoint; {N}: a path that does not exist; {T}: a
# scratch folder for outputs (it must stay empty); {NPY}: latents of the wrong shape;
# {JUNK}: a file of random bytes.
CASES = [
    # Flags and the config file.
    ("unknown_key", MAIN + ("--config.train.bach_size=3",), "did you mean --config.train.batch_size"),
    ("unknown_section", MAIN + ("--config.trian.batch_size=3",),
     "did you mean --config.train.batch_size"),
    ("key_below_a_leaf", MAIN + ("--config.seed.value=3",), "config.seed is a int, not a section"),
    ("int_not_a_number", MAIN + ("--config.train.batch_size=abc",), "--config.train.batch_size=abc"),
    ("float_not_a_number", MAIN + ("--config.loss.beta=lots",), "--config.loss.beta=lots"),
    ("section_given_a_value", MAIN + ("--config.train=3",), "is not a dict"),
    ("no_config_file", ("nda_jax.main", "--config=configs/nonexistent.py", "--workdir={W}"),
     "configs/nonexistent.py: cannot load the config file (no such file)"),
    ("unknown_variant", ("nda_jax.main", "--config=configs/demo.py:tny", "--workdir={W}"),
     "unknown config variant(s) ['tny']"),
    ("unknown_flag", MAIN + ("--workdri={T}",), "Unknown command line flag 'workdri'"),
    ("no_workdir", ("nda_jax.main", "--config=configs/demo.py:tiny"), "--workdir"),
    ("stray_argument", MAIN + ("extra",), "unexpected arguments ['extra']"),
    # Out-of-range values.
    ("negative_max_devices", MAIN + ("--config.max_devices=-1",), "config.max_devices=-1"),
    ("too_many_devices", MAIN + ("--config.max_devices=64",), "only 8 devices"),
    ("checkpoint_every_zero", MAIN + ("--config.checkpoint.every=0",), "config.checkpoint.every=0"),
    ("keep_zero", MAIN + ("--config.checkpoint.keep=0",), "config.checkpoint.keep=0"),
    ("negative_total_steps", MAIN + ("--config.train.total_steps=-5",), "config.train.total_steps=-5"),
    ("zero_batch", MAIN + ("--config.train.batch_size=0",), "config.train.batch_size=0"),
    ("batch_not_divisible", MAIN + ("--config.train.batch_size=12",), "divisible by the 8 devices"),
    ("zero_d_steps", MAIN + ("--config.train.num_d_steps=0",), "config.train.num_d_steps=0"),
    ("log_every_zero", MAIN + ("--config.train.log_every=0",), "config.train.log_every=0"),
    ("negative_beta", MAIN + ("--config.loss.beta=-1",), "config.loss.beta=-1"),
    ("negative_alpha", MAIN + ("--config.loss.alpha=-0.5",), "config.loss.alpha=-0.5"),
    ("ema_decay_above_one", MAIN + ("--config.train.ema_decay=1.5",), "config.train.ema_decay=1.5"),
    ("zero_width", MAIN + ("--config.model.ch=0",), "config.model.ch=0"),
    ("negative_sample_every", MAIN + ("--config.sample.every=-1",), "config.sample.every=-1"),
    ("negative_lr", MAIN + ("--config.optim.d.lr=-1",), "config.optim.d.lr=-1.0 must be > 0"),
    ("resolution", MAIN + ("--config.data.image_size=24",), "resolution=24 is not supported"),
    # Unknown names.
    ("unknown_nda", MAIN + ("--config.nda.name=jigsw",), "jigsaw"),
    ("unknown_loss", MAIN + ("--config.loss.kind=hinj",), "hinge"),
    ("unknown_trainer", MAIN + ("--config.trainer=gann",), "valid choices: ['dpc', 'gan'"),
    ("unknown_dtype", MAIN + ("--config.dtype=bfloat17",), "valid choices: ['bfloat16', 'float32']"),
    ("unknown_parallel", MAIN + ("--config.parallel=pmapp",), "valid choices: ('shard_map', 'pmap')"),
    ("unknown_best_mode", MAIN + ("--config.checkpoint.best_mode=minn",), "best_mode='minn'"),
    ("unknown_dataset", MAIN + ("--config.data.name=imagenett",), "Unknown data source 'imagenett'"),
    ("moco_queue_not_a_multiple", ("nda_jax.main", "--config=configs/demo_moco.py:tiny",
                                   "--workdir={T}/moco", "--config.moco.queue_size=100"),
     "config.moco.queue_size=100 must be a positive multiple of the global batch 32"),
    ("moco_negative_nda_weight", ("nda_jax.main", "--config=configs/demo_moco.py:tiny",
                                  "--workdir={T}/moco", "--config.nda.weight=-1"),
     "config.nda.weight=-1"),
    # Data, and a workdir that does not fit the config.
    ("missing_dataset", MAIN + ("--config.data.name=cifar100", "--config.data.image_size=32",
                                "--config.data.num_classes=100", "--config.data.data_dir={N}"),
     "{N}"),
    ("wrong_num_classes", MAIN + ("--config.data.num_classes=3",), "has 10 classes"),
    ("other_model_in_workdir", MAIN + ("--config.model.ch=8",), "holds another model than the config describes"),
    # Sampling.
    ("sample_negative_num", SAMPLE + ("--num=-5",), "--num=-5: must be a positive number"),
    ("sample_zero_batch", SAMPLE + ("--batch_size=0",), "--batch_size=0"),
    ("sample_no_checkpoint", ("nda_jax.sample", "--workdir={C}", "--out={T}/s.png"),
     "no checkpoint in {C}/checkpoints"),
    ("sample_not_a_run", ("nda_jax.sample", "--workdir={N}", "--out={T}/s.png"),
     "is not the workdir of a run"),
    ("sample_unknown_extension", ("nda_jax.sample", "--workdir={W}", "--out={T}/s.jpg"),
     "use a .npz or .png file name"),
    ("sample_unknown_step", SAMPLE + ("--checkpoint=7",), "kept steps: [2]"),
    ("sample_no_best", SAMPLE + ("--checkpoint=best",), "has a 'fd_digits' metric"),
    ("sample_missing_latents", SAMPLE + ("--latents={N}.npy",), "--latents file {N}.npy does not exist"),
    ("sample_latents_shape", SAMPLE + ("--latents={NPY}",), "expected [N, 32]"),
    ("sample_unreadable_latents", SAMPLE + ("--latents={JUNK}",), "is not a readable .npy array"),
    ("sample_num_not_int", SAMPLE + ("--num=many",), "--num"),
    # Evaluation.
    ("eval_not_a_run", ("nda_jax.eval", "--workdir={N}"), "does not exist"),
    ("eval_unknown_key", ("nda_jax.eval", "--workdir={W}", "--config.train.bach_size=3"),
     "batch_size"),
    ("eval_no_checkpoint", ("nda_jax.eval", "--workdir={C}"), "no checkpoint in"),
    ("eval_unknown_evaluator", ("nda_jax.eval", "--workdir={W}", "--only=fid"), "fid"),
    # Tools and importers.
    ("plot_not_a_run", ("nda_jax.tools.plot", "--workdir={N}"), "metrics.jsonl does not exist"),
    ("plot_unknown_extension", ("nda_jax.tools.plot", "--workdir={W}", "--out={T}/p.xyz"),
     "unknown image extension '.xyz'"),
    ("sheets_one_step", ("nda_jax.tools.sample_sheets", "--workdir={W}", "--out_dir={T}",
                         "--interp_steps=1"), "--interp_steps=1: must be >= 2"),
    ("sheets_no_checkpoint", ("nda_jax.tools.sample_sheets", "--workdir={C}", "--out_dir={T}"),
     "no checkpoint in"),
    ("show_augment_unknown_nda", ("nda_jax.tools.show_augment", "--nda=jigsw", "--out={T}/a.png"),
     "Unknown NDA(s) ['jigsw']"),
    ("show_augment_extension", ("nda_jax.tools.show_augment", "--out={T}/a.xyz"),
     "unknown image extension"),
    ("inception_missing_weights", ("nda_jax.importers.inception", "--pth={N}.pth", "--out={T}/i.npz"),
     "No FID Inception weights"),
    ("inception_unreadable_weights", ("nda_jax.importers.inception", "--pth={JUNK}.pth",
                                      "--out={T}/i.npz"), "not a readable PyTorch file"),
    ("inception_out_extension", ("nda_jax.importers.inception", "--pth={N}.pth", "--out={T}/i.txt"),
     "--out={T}/i.txt: use a .npz file name"),
    ("biggan_import_unreadable", ("nda_jax.importers.biggan_pytorch", "--G={JUNK}.pth",
                                  "--D={JUNK}.pth", "--config=configs/demo.py:tiny",
                                  "--workdir={T}/imported"), "not a readable PyTorch file"),
    ("biggan_import_into_a_run", ("nda_jax.importers.biggan_pytorch", "--G={N}.pth", "--D={N}.pth",
                                  "--config=configs/demo.py:tiny", "--workdir={W}"),
     "already holds checkpoints [2]"),
]


def _snapshot(folder):
  """{relative path: bytes} of every file under `folder` (what must not change)."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _make_run(workdir):
  """A run's workdir without training: config.json, a step-2 checkpoint of the initial
  state with its pipeline position, metrics.jsonl."""
  config = tiny_config()
  method = gan.GAN(config)
  config_lib.write_config(config, workdir)
  data_iter = pipeline.make_train_iterator(config.data, global_batch_size=method.examples_per_step,
                                           seed=config.seed)
  checkpointer = trainers.checkpointer(config, workdir)
  try:
    next(data_iter)
    checkpointer.save(2, method.init_state(jax.random.PRNGKey(0)), data_iter.get_state())
  finally:
    checkpointer.close()
    data_iter.close()
  writer = common.MetricWriter(workdir)
  writer.write(2, {"d_loss": 1.0, "g_loss": 1.0})
  writer.close()


_ONE_MAIN_AT_A_TIME = threading.Lock()   # One writer per workdir: a second `main` is refused.


def _run(case, places):
  _, command, _ = case
  module, *args = command
  cmd = [sys.executable, "-m", module, *(a.format(**places) for a in args)]
  try:
    with _ONE_MAIN_AT_A_TIME if module == "nda_jax.main" else contextlib.nullcontext():
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    return None, f"timed out after {TIMEOUT_S} s: {e.stdout}{e.stderr}"
  return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  base = tmp_path_factory.mktemp("bad_input")
  places = {k: str(base / k) for k in ("W", "C", "T")}
  places["N"] = str(base / "does_not_exist")
  _make_run(places["W"])
  os.makedirs(places["C"])
  os.makedirs(places["T"])
  with open(os.path.join(places["C"], config_lib.CONFIG_FILE), "w") as f:
    f.write(open(os.path.join(places["W"], config_lib.CONFIG_FILE)).read())
  places["NPY"] = str(base / "latents.npy")
  np.save(places["NPY"], np.zeros((3, 5), np.float32))
  places["JUNK"] = str(base / "junk")
  for suffix in ("", ".pth"):
    with open(places["JUNK"] + suffix, "wb") as f:
      f.write(np.random.RandomState(0).bytes(1000))
  before = {k: _snapshot(places[k]) for k in ("W", "C", "T")}
  with futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip([c[0] for c in CASES], pool.map(lambda c: _run(c, places), CASES)))
  after = {k: _snapshot(places[k]) for k in ("W", "C", "T")}
  return places, results, before, after


def test_enough_cases():
  assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_paragraph_and_a_failure(outcomes, case):
  places, results, _, _ = outcomes
  code, output = results[case[0]]
  assert code not in (None, 0), output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  message = [line for line in output.splitlines() if ": error: " in line
             or line.startswith("FATAL")]
  assert message, output[-3000:]
  assert case[2].format(**places) in output, output[-3000:]


def test_nothing_was_written(outcomes):
  """No case changed the run, created checkpoints/ where there was none, or wrote an output."""
  places, _, before, after = outcomes
  for key in ("W", "C", "T"):
    assert sorted(after[key]) == sorted(before[key]), key
    for path, data in before[key].items():
      assert after[key][path] == data, f"{key}/{path} changed"
  assert not os.path.exists(os.path.join(places["C"], "checkpoints"))
  assert not os.path.exists(places["N"])

