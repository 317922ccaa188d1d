"""Optional dependencies (setup.py's extras): a missing one is a user's install to complete.

`require("torch", "torch")` imports and returns the module, or raises
`MissingExtraError` naming the extra that installs it; every command prints
that as one paragraph (see `cli.run`), and also an ImportError of these modules
raised inside a library (fsspec's "Please install gcsfs" for a gs:// path).
`read_torch_file` is the one way a user's `.pth` is read.
"""
import importlib
import os
import re
import types
from typing import Any

# Optional modules -> the extra of setup.py that installs them.
EXTRAS = {"torch": "torch", "gcsfs": "gcs", "google.cloud.storage": "gcs",
          "torchvision": "detection", "pycocotools": "detection"}


class MissingExtraError(ImportError):
  """An optional dependency of the feature asked for is not installed."""


def require(module: str, extra: str, why: str = "", hint: str = "") -> types.ModuleType:
  """`import module`, or MissingExtraError saying which extra of nda_jax installs it
  (`why`: what needs it; `hint`: another way, appended to the message)."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    need = f"{why} needs" if why else "this needs"
    raise MissingExtraError(
        f"{need} {module.split('.')[0]}, which is not installed ({e}): install the "
        f"'{extra}' extra, pip install -e '.[{extra}]'{hint}") from None


def as_missing_extra(error: ImportError) -> MissingExtraError | None:
  """`error` as a MissingExtraError when it is about a module of `EXTRAS` (else None)."""
  if isinstance(error, MissingExtraError):
    return error
  text = f"{error.name or ''} {error}"
  for module, extra in EXTRAS.items():
    if re.search(rf"(?<![\w.]){re.escape(module)}(?![\w])", text):
      return MissingExtraError(
          f"{module} is not installed ({error}): install the '{extra}' extra, "
          f"pip install -e '.[{extra}]'")
  return None


def read_torch_file(path: str, expected: str, hint: str = "") -> Any:
  """`torch.load(path, weights_only=True)` of a user's file: MissingExtraError without torch
  (`hint` appended), FileNotFoundError if absent, and ValueError naming the file and
  `expected` (what to pass instead) when torch cannot read it. weights_only's unpickler
  runs no code; on junk it fails with whatever its opcodes or the zip reader hit
  (UnpicklingError, RuntimeError, EOFError, IndexError, KeyError, UnicodeDecodeError, ...),
  so every error of the load means an unreadable file."""
  torch = require("torch", "torch", why=f"reading {path}", hint=hint)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (see the docstring)
    raise ValueError(f"{path} is not a readable PyTorch file ({type(e).__name__}); pass "
                     f"{expected}") from None
