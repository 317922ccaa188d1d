"""CIFAR-10/100 from the official "python version" files, read without TensorFlow.

Accepted locations for `data_dir` (checked in this order):
  * the archive itself (`.../cifar-10-python.tar.gz`), read in memory;
  * the extracted folder (`.../cifar-10-batches-py`, holding the pickles);
  * a folder holding the extracted folder;
  * a folder holding the archive.
Each pickle is a dict with b'data' (uint8 [N, 3072], channel-major 32x32
planes) and the labels (b'labels' for CIFAR-10; b'fine_labels' and
b'coarse_labels' for CIFAR-100). The files are Python pickles, read with an
unpickler that admits only what the official files hold (NumPy arrays, builtin
containers): a crafted file is refused before any of it runs.
"""
import builtins
import codecs
import dataclasses
import functools
import io
import os
import pickle
import tarfile

import numpy as np

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SPLITS = ("train", "test")
IMAGE_SHAPE = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class Spec:
  """Where the official archive keeps each split and its labels."""
  name: str
  folder: str
  archive: str
  files: dict[str, tuple[str, ...]]
  num_classes: dict[str, int]  # label key -> number of classes

  def howto(self, data_dir: str) -> str:
    return (f"Download {self.archive} (python version) from {URL}, then either "
            f"put it in {data_dir} or extract it there (giving {self.folder}/), "
            f"and pass --config.data.data_dir={data_dir}.")


SPECS = {
    "cifar10": Spec(
        name="cifar10", folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
               "test": ("test_batch",)},
        num_classes={"labels": 10}),
    "cifar100": Spec(
        name="cifar100", folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        files={"train": ("train",), "test": ("test",)},
        num_classes={"fine_labels": 100, "coarse_labels": 20}),
}


def _locate(spec: Spec, data_dir: str) -> tuple[str, bool]:
  """Returns (path, is_archive) of the CIFAR files under `data_dir`."""
  if os.path.isfile(data_dir):
    return data_dir, True
  candidates = ((data_dir, False), (os.path.join(data_dir, spec.folder), False),
                (os.path.join(data_dir, spec.archive), True))
  for path, is_archive in candidates:
    probe = path if is_archive else os.path.join(path, spec.files["test"][0])
    if os.path.isfile(probe):
      return path, is_archive
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"{spec.name}: data_dir {data_dir!r} does not exist. "
        + spec.howto(data_dir))
  raise FileNotFoundError(
      f"{spec.name}: found neither {spec.folder}/ (with {spec.files['test'][0]}) "
      f"nor {spec.archive} in {data_dir!r}. " + spec.howto(data_dir))


# The only globals a CIFAR pickle names: NumPy's array reconstruction (under its
# NumPy 1 and 2 module names), builtin containers, and `_codecs.encode`, with
# which Python 3 spells bytes in protocol 2 (re-saved archives).
_ARRAY = {"_reconstruct": np.empty(0).__reduce__()[0], "ndarray": np.ndarray, "dtype": np.dtype}
_CONTAINERS = {name: getattr(builtins, name)
               for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray")}
_ALLOWED = {
    **{("numpy.core.multiarray", k): v for k, v in _ARRAY.items()},
    **{("numpy._core.multiarray", k): v for k, v in _ARRAY.items()},
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    **{(m, k): v for m in ("builtins", "__builtin__") for k, v in _CONTAINERS.items()},
    ("_codecs", "encode"): codecs.encode,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
  """The pickle names a callable no CIFAR file holds (it may be crafted to run code)."""


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals of `_ALLOWED`: nothing else can be called."""

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise _ForbiddenGlobal(f"{module}.{name}")
    return _ALLOWED[module, name]


def _unpickle(raw: bytes, where: str, spec: Spec, data_dir: str) -> dict:
  try:
    batch = _Unpickler(io.BytesIO(raw), encoding="bytes").load()
  except _ForbiddenGlobal as e:
    raise ValueError(f"{spec.name}: {where} is not an official CIFAR file: it calls {e}, "
                     "which no CIFAR archive does (refused before anything ran). "
                     + spec.howto(data_dir)) from None
  except Exception as e:  # pickle raises many types on corrupt input
    raise ValueError(f"{spec.name}: cannot unpickle {where} ({e!r}); the file "
                     "is corrupt or not a CIFAR pickle. "
                     + spec.howto(data_dir)) from e
  if not isinstance(batch, dict):
    raise ValueError(f"{spec.name}: {where} holds a {type(batch).__name__}, "
                     "not a CIFAR batch dict. " + spec.howto(data_dir))
  return batch


def _read_files(spec: Spec, path: str, is_archive: bool, split: str,
                data_dir: str) -> list[tuple[str, dict]]:
  """Unpickled batches of `split` as (where, dict) pairs."""
  names = spec.files[split]
  if not is_archive:
    out = []
    for name in names:
      where = os.path.join(path, name)
      if not os.path.isfile(where):
        raise FileNotFoundError(f"{spec.name}: missing {where}. "
                                + spec.howto(data_dir))
      with open(where, "rb") as f:
        out.append((where, _unpickle(f.read(), where, spec, data_dir)))
    return out
  members = {f"{spec.folder}/{name}": name for name in names}
  found = {}
  try:
    with tarfile.open(path, "r:gz") as tar:
      for member in tar:
        if member.name in members and member.isfile():
          found[member.name] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f"{spec.name}: cannot read archive {path} ({e!r}). "
                     + spec.howto(data_dir)) from e
  missing = sorted(set(members) - set(found))
  if missing:
    raise ValueError(f"{spec.name}: archive {path} lacks {missing}. "
                     + spec.howto(data_dir))
  return [(f"{path}:{m}", _unpickle(found[m], f"{path}:{m}", spec, data_dir))
          for m in members]


def _to_arrays(where: str, batch: dict, label_key: str, spec: Spec,
               data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  key = label_key.encode()
  if b"data" not in batch or key not in batch:
    raise ValueError(f"{spec.name}: {where} lacks b'data' or {key!r} "
                     f"(keys: {sorted(batch)}). " + spec.howto(data_dir))
  data = np.asarray(batch[b"data"])
  labels = np.asarray(batch[key])
  n = len(labels)
  if data.dtype != np.uint8 or data.shape != (n, 3072) or labels.ndim != 1:
    raise ValueError(f"{spec.name}: {where} has data {data.dtype} {data.shape} "
                     f"and {n} labels; expected uint8 [{n}, 3072]. "
                     + spec.howto(data_dir))
  if n and not 0 <= labels.min() <= labels.max() < spec.num_classes[label_key]:
    raise ValueError(f"{spec.name}: {where} has labels outside "
                     f"[0, {spec.num_classes[label_key]}). "
                     + spec.howto(data_dir))
  images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def load(name: str, data_dir: str, split: str,
         label_key: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
  """Returns (uint8 [N,32,32,3], int32 [N], num_classes) of one CIFAR split.

  `label_key` picks CIFAR-100's 'fine_labels' (default) or 'coarse_labels'.
  Results are cached per (file, mtime): treat the arrays as read-only.
  """
  if name not in SPECS:
    raise ValueError(f"Unknown CIFAR dataset {name!r}; choose one of {sorted(SPECS)}.")
  spec = SPECS[name]
  if split not in SPLITS:
    raise ValueError(f"{name}: unknown split {split!r}; choose one of {SPLITS}.")
  label_key = label_key or next(iter(spec.num_classes))
  if label_key not in spec.num_classes:
    raise ValueError(f"{name}: unknown label_key {label_key!r}; choose one of "
                     f"{sorted(spec.num_classes)}.")
  path, is_archive = _locate(spec, os.fspath(data_dir))
  probe = path if is_archive else os.path.join(path, spec.files[split][0])
  mtime = os.path.getmtime(probe) if os.path.exists(probe) else None
  images, labels = _load_cached(name, path, is_archive, split, label_key,
                                os.fspath(data_dir), mtime)
  return images, labels, spec.num_classes[label_key]


@functools.lru_cache(maxsize=4)
def _load_cached(name, path, is_archive, split, label_key, data_dir, mtime):
  del mtime  # only part of the cache key, so a rewritten file is re-read
  spec = SPECS[name]
  parts = [_to_arrays(where, batch, label_key, spec, data_dir)
           for where, batch in _read_files(spec, path, is_archive, split, data_dir)]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels
