"""A user's `.pth` that is not a PyTorch file ends in one ValueError naming it, in every
reader (MoCo and BigGAN importers, FID Inception weights); without torch each names
the extra to install. The junk-file tests need torch and skip without it."""
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from nda_jax import extras
from nda_jax.importers import biggan_pytorch
from nda_jax.importers import moco_pytorch
from nda_jax.models import inception_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READERS = {"moco": moco_pytorch.load_checkpoint, "biggan": biggan_pytorch.load_state_dict,
           "inception": inception_weights._read_pth}  # pylint: disable=protected-access
# What the readers caught before every load error counted (IndexError and KeyError escaped).
_CAUGHT_BEFORE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError)


@pytest.mark.parametrize("reader", READERS)
def test_without_torch_each_reader_names_the_extra(reader, tmp_path, monkeypatch):
  path = tmp_path / "weights.pth"
  path.write_bytes(b"\x80\x02}q\x00.")          # A real pickle; never read without torch.
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` raises ImportError.
  with pytest.raises(extras.MissingExtraError, match=r"install the 'torch' extra, pip install"):
    READERS[reader](str(path))


def _junk(tmp_path, torch):
  """Random bytes of several lengths, a real torch.save file cut short, a zip of another kind."""
  rng = np.random.default_rng(0)
  files = {f"random_{i}": rng.integers(0, 256, rng.integers(1, 5000)).astype(np.uint8).tobytes()
           for i in range(40)}
  real = io.BytesIO()
  torch.save({"w": torch.ones(64)}, real)
  for n in (0, 1, 100, len(real.getvalue()) // 2):
    files[f"cut_{n}"] = real.getvalue()[:n]
  other = io.BytesIO()
  with zipfile.ZipFile(other, "w") as z:
    z.writestr("notes.txt", "not a checkpoint")
  files["other_zip"] = other.getvalue()
  paths = {}
  for name, data in files.items():
    paths[name] = tmp_path / f"{name}.pth"
    paths[name].write_bytes(data)
  return paths


def test_junk_is_one_value_error_naming_the_file(tmp_path):
  torch = pytest.importorskip("torch")
  paths = _junk(tmp_path, torch)
  escaped = []
  for path in paths.values():
    try:
      torch.load(path, map_location="cpu", weights_only=True)
    except _CAUGHT_BEFORE:
      pass
    except Exception as e:  # pylint: disable=broad-except
      escaped.append(type(e).__name__)
  assert escaped, "premise: some junk fails with an error the old readers let through"
  for name, path in paths.items():
    for reader in READERS.values():
      with pytest.raises(ValueError, match=f"{path} is not a readable PyTorch file") as info:
        reader(str(path))
      assert info.value.__cause__ is None and info.value.__suppress_context__, name


def test_moco_importer_cli_on_junk_is_one_paragraph(tmp_path):
  torch = pytest.importorskip("torch")
  failing = []
  for path in _junk(tmp_path, torch).values():
    try:
      torch.load(path, map_location="cpu", weights_only=True)
    except _CAUGHT_BEFORE:
      pass
    except Exception:  # pylint: disable=broad-except
      failing.append(path)
  assert failing
  for path in (failing[0], tmp_path / "random_0.pth"):   # One the old code let escape.
    proc = subprocess.run([sys.executable, "-m", "nda_jax.importers.moco_pytorch",
                           f"--checkpoint={path}", "--config=configs/demo_moco.py:tiny",
                           f"--workdir={tmp_path}/imported"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    message = [line for line in output.splitlines() if ": error: " in line]
    assert len(message) == 1 and message[0].startswith(
        f"nda_jax.importers.moco_pytorch: error: {path} is not a readable PyTorch file ("
    ), output[-3000:]
    assert not os.path.exists(tmp_path / "imported")
