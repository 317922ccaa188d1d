r"""pytorch-fid's FID Inception weights -> Flax variables of `models.inception`.

Below the evaluators and the importer command (`nda_jax.importers.inception`),
which both read the weights through `load`.

The weights cannot be downloaded at run time; get the file once from
pytorch-fid's GitHub release (`WEIGHTS_URL`, 91 MB). It is TF's
`inception-2015-12-05` graph ported to PyTorch, i.e. the network TTUR uses.

Two input formats:
  * `pt_inception-2015-12-05-6726825d.pth` (a torch `state_dict`; reading it
    needs torch, imported lazily);
  * a NumPy `.npz` (`save_npz`), for machines without torch (TPU VMs):

  python -m nda_jax.importers.inception \
      --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

Name mapping (torchvision naming, used by pytorch-fid):
  `<block>.conv.weight` [O,I,kh,kw] -> params/<block>/conv/kernel [kh,kw,I,O]
  `<block>.bn.weight|bias`          -> params/<block>/bn/scale|bias
  `<block>.bn.running_mean|var`     -> batch_stats/<block>/bn/mean|var
  `fc.weight` [1008,2048] / `fc.bias` -> params/fc/kernel [2048,1008] / bias
where <block> is e.g. `Mixed_5b.branch1x1` -> Mixed_5b/branch1x1. BN's
`num_batches_tracked` is ignored. Every other key, and every Flax variable
left unfilled, is an error.
"""
import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nda_jax import extras
from nda_jax.models import inception

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)

Variables = dict[str, Any]

_LEAVES = {
    "conv.weight": ("params", "conv", "kernel"),
    "bn.weight": ("params", "bn", "scale"),
    "bn.bias": ("params", "bn", "bias"),
    "bn.running_mean": ("batch_stats", "bn", "mean"),
    "bn.running_var": ("batch_stats", "bn", "var"),
}
_IGNORED_SUFFIX = "num_batches_tracked"


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
  """'collection/path/leaf' -> shape of every variable of `InceptionV3FID`."""
  abstract = jax.eval_shape(inception.InceptionV3FID(resize=None).init,
                            jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  return {k: v.shape for k, v in flatten(abstract).items()}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested variables -> {'collection/path/leaf': array} (the `.npz` keys)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def unflatten(flat: Mapping[str, np.ndarray]) -> Variables:
  """The inverse of `flatten`."""
  tree: Variables = {}
  for key, value in flat.items():
    *path, leaf = key.split("/")
    node = tree
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flax_key(torch_key: str) -> str:
  """Torch state_dict key -> 'collection/path/leaf' key of the Flax variables."""
  if torch_key == "fc.weight":
    return "params/fc/kernel"
  if torch_key == "fc.bias":
    return "params/fc/bias"
  parts = torch_key.split(".")
  leaf = ".".join(parts[-2:])
  if leaf not in _LEAVES:
    raise ValueError(f"State_dict key {torch_key!r} is not part of the FID Inception "
                     f"(expected '<block>.conv.weight', '<block>.bn.*' or 'fc.*'); is this "
                     f"pytorch-fid's {WEIGHTS_FILE}?")
  collection, layer, name = _LEAVES[leaf]
  return "/".join([collection, *parts[:-2], layer, name])


def convert_state_dict(state_dict: Mapping[str, Any]) -> Variables:
  """pytorch-fid `state_dict` (NumPy-convertible values) -> {'params', 'batch_stats'}."""
  expected = expected_shapes()
  flat = {}
  for torch_key, value in state_dict.items():
    if torch_key.endswith(_IGNORED_SUFFIX):
      continue
    key = _flax_key(torch_key)
    array = np.asarray(value, np.float32)
    if key.endswith("conv/kernel"):
      array = array.transpose(2, 3, 1, 0)
    elif key == "params/fc/kernel":
      array = array.T
    if key not in expected:
      raise ValueError(f"State_dict key {torch_key!r} maps to {key!r}, which the FID "
                       f"Inception does not have.")
    if array.shape != expected[key]:
      raise ValueError(f"{torch_key!r}: shape {array.shape} after conversion, the FID Inception "
                       f"needs {expected[key]} (torchvision's Inception weights have 1000 "
                       f"classes and other blocks: use pytorch-fid's {WEIGHTS_FILE}).")
    flat[key] = np.ascontiguousarray(array)
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise ValueError(f"State_dict lacks {len(missing)} FID Inception weights, e.g. "
                     f"{missing[:5]}; is this pytorch-fid's {WEIGHTS_FILE}?")
  return unflatten(flat)


def save_npz(variables: Variables, path: str) -> None:
  """Flat `.npz` ('params/Mixed_5b/...' keys) readable without torch."""
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flatten(variables).items()})


def _read_pth(path: str) -> dict[str, np.ndarray]:
  state_dict = extras.read_torch_file(
      path, f"pytorch-fid's {WEIGHTS_FILE}",
      hint=(f". Without torch, convert it once elsewhere (python -m nda_jax.importers.inception "
            f"--pth={path} --out=inception_fid.npz) and pass the .npz"))
  return {k: v.numpy() for k, v in state_dict.items()}


def _read_npz(path: str) -> Variables:
  expected = expected_shapes()
  with np.load(path) as f:
    flat = {k: f[k] for k in f.files}
  if set(flat) != set(expected):
    raise ValueError(f"{path!r} is not an FID Inception .npz: missing "
                     f"{sorted(set(expected) - set(flat))[:5]}, unexpected "
                     f"{sorted(set(flat) - set(expected))[:5]}.")
  for k, v in flat.items():
    if v.shape != expected[k]:
      raise ValueError(f"{path!r}: {k} has shape {v.shape}, expected {expected[k]}.")
  return unflatten(flat)


def load(path: str | None) -> Variables:
  """Flax variables of `InceptionV3FID` from pytorch-fid's `.pth` or our `.npz`."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(
        f"No FID Inception weights at {path!r}. Nothing is downloaded at run time: fetch "
        f"{WEIGHTS_URL} once (pytorch-fid's release) and pass its path, or a .npz converted "
        f"from it with `python -m nda_jax.importers.inception --pth=... --out=...`.")
  if path.endswith(".npz"):
    return _read_npz(path)
  if path.endswith((".pth", ".pt")):
    return convert_state_dict(_read_pth(path))
  raise ValueError(f"{path!r}: expected pytorch-fid's .pth or a converted .npz.")

