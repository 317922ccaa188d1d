"""Every module of the package imports into one process: a CLI's absl flags are
defined only when it runs as a script, so tests (and notebooks) that import two
CLIs for their functions never meet a DuplicateFlagError."""
import pathlib
import subprocess
import sys

CODE = """
import importlib, pkgutil, nda_jax
names = [m.name for m in pkgutil.walk_packages(nda_jax.__path__, "nda_jax.")]
for name in names:
  try:
    importlib.import_module(name)
  except ModuleNotFoundError as e:   # modules of the optional torch extras
    if e.name.split(".")[0] not in ("torch", "torchvision", "pycocotools"):
      raise
print(len(names))
"""


def test_every_module_imports_into_one_process():
  proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert int(proc.stdout.split()[-1]) > 50   # the walk found the package's modules


BENCH_PAIRS = """
import importlib, sys
sys.path.insert(0, "bench")
for name in sys.argv[1:]:
  importlib.import_module(name)
print("ok")
"""


def test_bench_scripts_import_the_runners_they_time():
  """official_torch_step --with_nda_jax imports gan_step, official_moco_step imports
  moco_step: each pair's absl flags meet in one process (two runs: the official
  benches share flag names such as --batch, as scripts may)."""
  for pair in (["official_torch_step", "gan_step"], ["official_moco_step", "moco_step"]):
    proc = subprocess.run([sys.executable, "-c", BENCH_PAIRS, *pair], capture_output=True,
                          text=True, timeout=600, cwd=pathlib.Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "ok"
