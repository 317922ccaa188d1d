"""Every module of the package imports into one process: a CLI's absl flags are
defined only when it runs as a script, so tests (and notebooks) that import two
CLIs for their functions never meet a DuplicateFlagError."""
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
