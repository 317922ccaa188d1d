"""A user's mistake ends in one paragraph that says what to do: no traceback, a non-zero
exit status, nothing in an existing workdir overwritten.

Every case runs the real command line (`python -m ...`) in a subprocess, against a run
workdir made once for the module (config.json, a step-2 checkpoint with its pipeline
position, metrics.jsonl). The cases run a few at a time; each test then checks one.
"""
from concurrent import futures
import contextlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import threading

import jax
import numpy as np
from PIL import Image
import pytest

from nda_jax import config_lib
from nda_jax import trainers
from nda_jax.data import pipeline
from nda_jax.trainers import common
from nda_jax.trainers import gan
import snapshot
from test_gan_trainer import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240   # A case that does not fail starts training (minutes to compile): a failure.

# Without torch (README's install) the importers name the extra that installs it.
UNREADABLE_PTH = ("not a readable PyTorch file" if importlib.util.find_spec("torch")
                  else "install the 'torch' extra, pip install -e '.[torch]'")
MAIN = ("nda_jax.main", "--config=configs/demo.py:tiny", "--workdir={W}")
SAMPLE = ("nda_jax.sample", "--workdir={W}", "--out={T}/s.png")

# A command under `faults` sees FOLDER's file system refuse writes (tests/faults.py).
def _faulty(code, folder, *substring):
  return ("faults", code, folder, *substring, "--")


# (id, command, a fragment the message must hold). {W}: the run's workdir; {C}: a folder
# with the run's config.json but no checkpoint; {N}: a path that does not exist; {T}: a
# scratch folder for outputs (it must stay empty); {NPY}: latents of the wrong shape;
# {JUNK}: a file of random bytes; {F}: a finished run (its checkpoint at the last step);
# {TC}: a run whose config.json is cut off; {SYN}, {TYPO}: config files with a syntax
# error and a typo'd attribute; {IMG}: an image folder with an empty class folder;
# {CRAFTED}: CIFAR-10 files whose unpickling would create {T}/created.
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
    ("canvas_smaller_than_the_view", ("nda_jax.main", "--config=configs/imagenet_moco.py",
                                      "--workdir={T}/in_moco", "--config.data.canvas_size=100"),
     "must be an integer of at least the view size config.data.views.size=224"),
    # Data, and a workdir that does not fit the config.
    ("missing_dataset", MAIN + ("--config.data.name=cifar100", "--config.data.image_size=32",
                                "--config.data.num_classes=100", "--config.data.data_dir={N}"),
     "{N}"),
    ("wrong_num_classes", MAIN + ("--config.data.num_classes=3",), "has 10 classes"),
    ("config_changed_on_resume", MAIN + ("--config.nda.name=cutout",),
     "with another config: nda.name: \"jigsaw\" -> \"cutout\""),
    ("other_model_in_workdir", MAIN + ("--config.model.ch=8", "--allow_config_change"),
     "holds another model than the config describes"),
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
                                      "--out={T}/i.npz"), UNREADABLE_PTH),
    ("inception_out_extension", ("nda_jax.importers.inception", "--pth={N}.pth", "--out={T}/i.txt"),
     "--out={T}/i.txt: use a .npz file name"),
    ("biggan_import_unreadable", ("nda_jax.importers.biggan_pytorch", "--G={JUNK}.pth",
                                  "--D={JUNK}.pth", "--config=configs/demo.py:tiny",
                                  "--workdir={T}/imported"), UNREADABLE_PTH),
    ("moco_import_unreadable", ("nda_jax.importers.moco_pytorch", "--checkpoint={JUNK}.pth",
                                "--config=configs/demo_moco.py:tiny", "--workdir={T}/imported"),
     UNREADABLE_PTH),
    # A storage that refuses writes, a config that cannot be read, data that is not data.
    ("disk_full_new_run", _faulty("ENOSPC", "{T}") + MAIN[:2] + ("--workdir={T}/run",),
     "cannot write {T}/run: the disk is full"),
    ("disk_full_at_config", _faulty("ENOSPC", "{W}", "config.json") + MAIN,
     "the disk is full (No space left on device)"),
    ("read_only_run", _faulty("EROFS", "{W}") + MAIN, "the file system is read-only"),
    ("read_only_finished_run", _faulty("EROFS", "{F}") + MAIN[:2] + ("--workdir={F}",),
     "cannot write {F}/lock.json: the file system is read-only"),   # The lock is taken first.
    ("read_only_sample_out", _faulty("EROFS", "{T}") + SAMPLE, "cannot write {T}/s.png"),
    ("config_syntax_error", ("nda_jax.main", "--config={SYN}", "--workdir={T}/run"),
     "SyntaxError: invalid syntax ({SYN}, line 1: def get_config(:)"),
    ("config_typo_attribute", ("nda_jax.main", "--config={TYPO}", "--workdir={T}/run"),
     "AttributeError: 'trian'; Did you mean \"train\" instead of \"trian\"? ({TYPO}, line 5: "
     "config.trian.batch_size = 16)"),
    ("truncated_config_sample", ("nda_jax.sample", "--workdir={TC}", "--out={T}/s.png"),
     "{TC}/config.json is not a readable config (JSONDecodeError"),
    ("truncated_config_eval", ("nda_jax.eval", "--workdir={TC}"),
     "{TC}/config.json is not a readable config"),
    ("empty_class_folder", MAIN + ("--config.data.name=image_folder", "--config.data.data_dir={IMG}",
                                   "--config.data.num_classes=2"),
     "Class folder '{IMG}/train/empty' holds no"),
    ("crafted_cifar", MAIN + ("--config.data.name=cifar10", "--config.data.image_size=32",
                              "--config.data.data_dir={CRAFTED}"),
     "is not an official CIFAR file: it calls posix.system"),
    ("biggan_import_into_a_run", ("nda_jax.importers.biggan_pytorch", "--G={N}.pth", "--D={N}.pth",
                                  "--config=configs/demo.py:tiny", "--workdir={W}"),
     "already holds checkpoints [2]"),
]


SNAPSHOTS = ("W", "C", "T", "F", "TC", "IMG", "CRAFTED")


class _CreatesAFile:
  """Unpickles into `os.system('touch PATH')`: what a crafted data file would run."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f"touch {self.path}",)


def _write_inputs(base, places):
  """The config files, image folder and CIFAR files of the cases (outside {T})."""
  places["SYN"] = str(base / "syntax_error.py")
  (base / "syntax_error.py").write_text("def get_config(:\n  pass\n")
  places["TYPO"] = str(base / "typo.py")
  (base / "typo.py").write_text(
      "import ml_collections\n\ndef get_config():\n"
      "  config = ml_collections.ConfigDict({'train': {'batch_size': 8}})\n"
      "  config.trian.batch_size = 16\n  return config\n")
  places["IMG"] = str(base / "images")
  for name, count in (("digits", 2), ("empty", 0)):
    (base / "images" / "train" / name).mkdir(parents=True)
    for i in range(count):
      Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(base / "images" / "train" / name / f"{i}.png")
  places["CRAFTED"] = str(base / "cifar")
  folder = base / "cifar" / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    with open(folder / name, "wb") as f:
      pickle.dump({b"payload": _CreatesAFile(os.path.join(places["T"], "created")),
                   b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f, protocol=2)


def _make_run(workdir, step=2):
  """A run's workdir without training: config.json, a checkpoint at `step` of the
  initial state (its step counter set to `step`) with its pipeline position, metrics.jsonl."""
  config = tiny_config()
  method = gan.GAN(config)
  config_lib.write_config(config, workdir)
  data_iter = pipeline.make_train_iterator(config.data, global_batch_size=method.examples_per_step,
                                           seed=config.seed)
  checkpointer = trainers.checkpointer(config, workdir)
  try:
    next(data_iter)
    state = method.init_state(jax.random.PRNGKey(0))
    checkpointer.save(step, state.replace(step=jax.numpy.asarray(step, state.step.dtype)),
                      data_iter.get_state())
  finally:
    checkpointer.close()
    data_iter.close()
  writer = common.MetricWriter(workdir)
  writer.write(step, {"d_loss": 1.0, "g_loss": 1.0})
  writer.close()


_ONE_MAIN_AT_A_TIME = threading.Lock()   # One writer per workdir: a second `main` is refused.


def _run(case, places):
  _, command, _ = case
  module, *args = command
  cmd = [sys.executable, "-m", module, *(a.format(**places) for a in args)]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(   # tests/ for `faults`.
      [os.path.join(REPO, "tests"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])}
  try:
    with _ONE_MAIN_AT_A_TIME if "nda_jax.main" in command else contextlib.nullcontext():
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT_S,
                            env=env)
  except subprocess.TimeoutExpired as e:
    return None, f"timed out after {TIMEOUT_S} s: {e.stdout}{e.stderr}"
  return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  base = tmp_path_factory.mktemp("bad_input")
  places = {k: str(base / k) for k in ("W", "C", "T", "F", "TC")}
  places["N"] = str(base / "does_not_exist")
  _make_run(places["W"])
  _make_run(places["F"], step=tiny_config().train.total_steps)
  _make_run(places["TC"])
  config_json = os.path.join(places["TC"], config_lib.CONFIG_FILE)
  with open(config_json) as f:
    text = f.read()
  with open(config_json, "w") as f:
    f.write(text[:len(text) // 2])
  _write_inputs(base, places)
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
  before = {k: snapshot.tree(places[k]) for k in SNAPSHOTS}
  with futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip([c[0] for c in CASES], pool.map(lambda c: _run(c, places), CASES)))
  after = {k: snapshot.tree(places[k]) for k in SNAPSHOTS}
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
  for key in SNAPSHOTS:
    assert sorted(after[key]) == sorted(before[key]), key
    for path, data in before[key].items():
      assert after[key][path] == data, f"{key}/{path} changed"
  assert not os.path.exists(os.path.join(places["C"], "checkpoints"))
  assert not os.path.exists(places["N"])



# What tensorstore raised when a checkpoint filled a 1 MiB tmpfs during `main` (measured
# on this project's CI machine: orbax re-raises it as a ValueError, the errno only in text).
_TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "g_params.blocks_0.bn2.gain.embedding/0.3" in OCDBT '
    'database at local file "/mnt/run/checkpoints/2.orbax-checkpoint-tmp/state.orbax-'
    'checkpoint-tmp/ocdbt.process_0/": Failed writing: "/mnt/run/checkpoints/2.orbax-'
    'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/426e31b244e2a849431e8100b9'
    '29c814": Failed to write 35983 bytes to file 14: No space left on device '
    "[os_error_code='28']")


def test_storage_errors_are_recognised_in_a_chain():
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  assert cli.describe_storage_error(ValueError(_TENSORSTORE_FULL)).startswith(
      "cannot write /mnt/run/checkpoints/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/"
      "ocdbt.process_0/d/426e31b244e2a849431e8100b929c814: the disk is full")
  try:
    try:
      raise OSError(30, os.strerror(30), "/ro/run/config.json")
    except OSError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as wrapped:
    message = cli.describe_storage_error(wrapped)
  assert message.startswith("cannot write /ro/run/config.json: the file system is read-only")
  assert cli.describe_storage_error(ValueError("some bug")) is None
  assert cli.describe_storage_error(FileNotFoundError(2, "No such file", "/x")) is None


_RECORDS = ['{"step": 1, "d_loss": 1.0}', '{"step": 2, "d_loss": 0.5}']


def test_cut_off_metrics_line_is_dropped_before_appending(tmp_path):
  """A run killed mid-write left half a record; the next writer starts on a new line."""
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(_RECORDS) + '\n{"step": 3, "d_lo')
  writer = common.MetricWriter(str(tmp_path))
  writer.write(4, {"d_loss": 0.25})
  writer.close()
  assert path.read_text().splitlines() == _RECORDS + ['{"step": 4, "d_loss": 0.25}']
  assert [r["step"] for r in common.read_metrics(str(tmp_path))] == [1, 2, 4]


def test_plot_skips_a_bad_line_naming_it(tmp_path):
  """A record glued onto a cut-off one (as written before the repair) is skipped by readers
  with file and line named; the plot of the other records is written."""
  (tmp_path / "metrics.jsonl").write_text(
      _RECORDS[0] + '\n{"step": 2, "d_lo{"step": 3, "d_loss": 0.4}\n' + _RECORDS[1] + "\n")
  out = tmp_path / "plot.png"
  proc = subprocess.run([sys.executable, "-m", "nda_jax.tools.plot", f"--workdir={tmp_path}",
                         f"--out={out}"], capture_output=True, text=True, cwd=REPO,
                        timeout=TIMEOUT_S)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  assert f"{tmp_path}/metrics.jsonl:2 is not a metrics record" in output, output[-3000:]
  assert out.exists()


_TB_ON_A_FULL_DISK = """
import os, sys, time
from nda_jax.trainers import common
writer = common.MetricWriter(sys.argv[1])
for step in range(20):   # ~1.3 KB of events: tensorboardX's thread holds them in its 8 KB buffer
  writer.write(step, {"loss": 1.0})
time.sleep(2.0)          # (its queue drained into the buffer)
fd = os.open(sys.argv[1] + "/filler", os.O_WRONLY | os.O_CREAT)   # Another writer fills the disk.
try:
  while True:
    os.write(fd, bytes(4096))
except OSError as e:
  print("disk full:", e.strerror)
writer.close()           # As the loop does on its way out, error or not.
print("closed")
"""


_TB_FULL_MID_RUN = """
import os, sys, time
from nda_jax.trainers import common
run, disk = sys.argv[1], sys.argv[2]
os.symlink(disk, run + "/tensorboard")   # The events on a small disk, metrics.jsonl not.
writer = common.MetricWriter(run)
for step in range(20):
  writer.write(step, {"loss": 1.0})
time.sleep(2.0)
fd = os.open(disk + "/filler", os.O_WRONLY | os.O_CREAT)   # Another writer fills that disk.
try:
  while True:
    os.write(fd, bytes(4096))
except OSError as e:
  print("disk full:", e.strerror)
for step in range(20, 420):   # ~27 KB of events: the 8 KB buffer overflows mid-run.
  writer.write(step, {"loss": 1.0})
print("wrote all")
writer.close()
print("closed")
"""


@contextlib.contextmanager
def _tmpfs(path, size="256k"):
  """A small tmpfs at `path` (a real file system that fills); skips without the privilege."""
  os.makedirs(path)
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_tensorboard_events_on_a_full_disk_end_in_one_warning(tmp_path):
  """A real full disk (tmpfs): TensorBoard's last flush fails when the writer closes; that
  is one warning, and tensorboardX's atexit hook does not flush again (a traceback after
  the run's one-paragraph error, before)."""
  with _tmpfs(tmp_path / "disk") as disk:
    proc = subprocess.run([sys.executable, "-c", _TB_ON_A_FULL_DISK, str(disk)],
                          capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert "disk full: No space left on device" in output, output[-3000:]   # The premise.
    assert proc.returncode == 0 and "closed" in proc.stdout, output[-3000:]
    assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
    warning = [line for line in output.splitlines() if "TensorBoard events in" in line]
    assert len(warning) == 1 and "No space left on device" in warning[0], output[-3000:]
    assert f"{disk}/tensorboard" in warning[0]


def test_tensorboard_events_failing_mid_run_do_not_stop_the_run(tmp_path):
  """The event file's disk fills mid-run: tensorboardX's thread used to die on the
  OSError, its queue of 10 events filled and the next add_scalar blocked the loop for
  good (this script timed out). Now the events are given up with one warning and every
  record still reaches metrics.jsonl."""
  run = tmp_path / "run"
  run.mkdir()
  with _tmpfs(tmp_path / "disk") as disk:
    proc = subprocess.run([sys.executable, "-c", _TB_FULL_MID_RUN, str(run), str(disk)],
                          capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert "disk full: No space left on device" in output, output[-3000:]   # The premise.
    assert proc.returncode == 0 and "wrote all" in proc.stdout and "closed" in proc.stdout, \
        output[-3000:]
    assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
    warning = [line for line in output.splitlines() if "TensorBoard events in" in line]
    assert len(warning) == 1 and "No space left on device" in warning[0], output[-3000:]
  steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(420))
