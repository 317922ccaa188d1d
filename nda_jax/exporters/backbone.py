"""A MoCo backbone's Flax variables -> the layouts detection engines load.

- 'torchvision': a torchvision ResNet `state_dict` (`conv1`, `bn1`,
  `layer1.0.conv1`, ..., BN running stats and a zero `num_batches_tracked`, so
  `load_state_dict(strict=True)` of a ResNet without `fc` accepts it; no `fc`).
  The inverse of `importers.moco_pytorch.convert_encoder` into a `ResNet`.
- 'detectron2': the pickle facebookresearch/moco's
  detection/convert-pretrain-to-detectron2.py writes, `{"model": {name: numpy
  array}, "__author__": ..., "matching_heuristics": True}`, with Detectron2's
  ResNet names (`stem.conv1`, `res2.0.conv1`, `.norm.` for BN, `shortcut`), which
  Detectron2's checkpointer matches to R50-C4 / FPN backbones.

'torchvision' holds every backbone of `models.resnet`: torchvision's own
`resnet18/34/50` load the 'imagenet' stem at width 64, and
`detection.torch_resnet` (the same keys, torchvision's blocks) any stem and
width, read off the file's shapes; a 'cifar' stem (3x3 conv) or another width
cannot load into torchvision's class by mistake, its shapes differ. Detectron2's
ResNet runs only the 'imagenet' stem at width 64 (its configs build that), so
'detectron2' refuses the others rather than write names that would load wrongly.

Command line (a MoCo run's, or an imported release's, query-encoder backbone):

  python -m nda_jax.exporters.backbone --workdir=W [--checkpoint=latest|best|N] \
      --format=torchvision|detectron2 --out=FILE

'torchvision' writes a `torch.save` file (needs torch), 'detectron2' a pickle
of NumPy arrays (no torch), as Detectron2's MODEL.WEIGHTS reads it.
"""
import os
import pickle
import re
from typing import Any, Mapping

import jax
import numpy as np

from nda_jax.importers import moco_pytorch

FORMATS = ("torchvision", "detectron2")


def check_exportable(stem: str, width: int, fmt: str) -> None:
  """ValueError (one paragraph) for a backbone `fmt`'s ResNet cannot represent."""
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}; valid choices: {FORMATS}")
  if fmt == "torchvision":
    return
  if stem != "imagenet":
    raise ValueError(
        f"the backbone has the {stem!r} stem (3x3/1 conv, no max-pool); Detectron2's "
        f"ResNet runs the 'imagenet' stem (7x7/2 conv, max-pool), so its weights would "
        f"load under the right names into the wrong network. Use --format=torchvision "
        f"(nda_jax.detection.torch_resnet runs any stem), or export a run trained with "
        f"config.model.stem='imagenet'.")
  if width != 64:
    raise ValueError(
        f"the backbone is {width} channels wide; MoCo's Detectron2 configs build the "
        f"standard 64-wide ResNet (MODEL.RESNETS.STEM_OUT_CHANNELS=64), whose checkpointer "
        f"would reject these shapes. Use --format=torchvision, whose layout holds any width.")


def to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A `ResNet`'s {'params', 'batch_stats'} -> torchvision state_dict arrays (float32)."""
  out = {}

  def put(path, leaf):
    collection, *modules, name = [p.key for p in path]
    module = ".".join(moco_pytorch._torch_module(modules))  # pylint: disable=protected-access
    key = f"{module}.{moco_pytorch._LEAVES[collection, name]}"  # pylint: disable=protected-access
    value = np.array(leaf, np.float32)  # a writable copy (torch.from_numpy needs one)
    if name == "kernel" and value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif name == "kernel":
      raise ValueError(f"{key}: a {value.ndim}-d kernel is no ResNet backbone's (head left in?)")
    out[key] = np.ascontiguousarray(value)
    if name == "mean":
      out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)

  jax.tree_util.tree_map_with_path(put, {k: variables[k] for k in ("params", "batch_stats")})
  return out


def detectron2_name(key: str) -> str:
  """torchvision ResNet name -> Detectron2's, as MoCo's converter renames."""
  if not key.startswith("layer"):
    key = "stem." + key
  key = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
  key = re.sub(r"bn(\d)", r"conv\1.norm", key)
  return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(variables: Mapping[str, Any]) -> dict[str, Any]:
  """A `ResNet`'s variables -> the pickled dict MoCo's converter writes (no head, no
  `num_batches_tracked`: Detectron2's BN keeps no such counter)."""
  model = {detectron2_name(k): v for k, v in to_torchvision(variables).items()
           if not k.endswith("num_batches_tracked")}
  return {"model": model, "__author__": "nda_jax", "matching_heuristics": True}


def export(workdir: str, checkpoint: str | int, fmt: str, out: str) -> None:
  """The backbone of `workdir`'s MoCo query encoder at `checkpoint` -> `out` in `fmt`."""
  from nda_jax import config_lib, trainers  # pylint: disable=g-import-not-at-top
  if os.path.exists(out):
    raise ValueError(f"--out={out} exists; pass a new file name (nothing is overwritten)")
  config = config_lib.load_run_config(
      workdir, "--workdir", "moco",
      "the exporter reads MoCo runs and workdirs of nda_jax.importers.moco_pytorch")
  check_exportable(config.model.stem, int(config.model.width), fmt)
  try:
    _, _, state = trainers.load_run(workdir, checkpoint)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"--checkpoint={checkpoint!r}: {e}") from None
  variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
  if fmt == "detectron2":
    with open(out, "wb") as f:
      pickle.dump(to_detectron2(variables), f)
    return
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("--format=torchvision writes a torch file and needs torch: "
                      "pip install -e '.[detection]'") from e
  torch.save({k: torch.from_numpy(v) for k, v in to_torchvision(variables).items()}, out)


_PROG = "nda_jax.exporters.backbone"


def main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  which = int(f.checkpoint) if f.checkpoint.isdigit() else f.checkpoint
  try:
    export(f.workdir, which, f.format, f.out)
  except (ValueError, FileNotFoundError, ImportError) as e:
    cli.fail(_PROG, str(e))
  print(f"wrote the {f.format} backbone of {f.workdir} ({f.checkpoint}) to {f.out}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A MoCo workdir.", required=True)
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step.")
  flags.DEFINE_enum("format", None, list(FORMATS), "Target layout.", required=True)
  flags.DEFINE_string("out", None, "The file to write (new).", required=True)
  cli.run(main, _PROG)
