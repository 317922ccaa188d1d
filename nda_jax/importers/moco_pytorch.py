"""facebookresearch/moco checkpoints -> Flax variables of `models.resnet` encoders.

Accepted checkpoints (read with `load_checkpoint`, converted with `convert_encoder`):
- main_moco.py's (`moco_v2_200ep_pretrain.pth.tar`, ...): a dict with 'state_dict'
  holding `module.encoder_q.<torchvision resnet name>` (the query encoder; the
  MLP head as `fc.0` / `fc.2`), `module.encoder_k.*` and `module.queue`. The
  default prefix 'module.encoder_q.' converts the query encoder into a
  `MocoEncoder` (backbone + head); the key encoder (prefix 'module.encoder_k.')
  converts the same way; the queue is not part of an encoder. MoCo v1's
  checkpoints (`moco_v1_200ep_pretrain.pth.tar`) hold a linear `fc` head: import
  them with `--config.model.mlp_head=False`.
- torchvision-style ResNet state_dicts: main_lincls.py's output (prefix
  'module.') or a torchvision model's (prefix ''). Their `fc` is a linear
  classifier, not the MoCo head, so they convert into a bare `ResNet` (an
  encoder's `.backbone`); converting into a `ResNet` skips the `fc.*` keys,
  whatever they hold.

The conversion walks the Flax model's own variables and reads the torch key of
each (conv weights OIHW -> HWIO, linear [out, in] -> [in, out]; BN weight, bias,
running_mean, running_var -> scale, bias, mean, var; `num_batches_tracked` is
read and dropped: it only matters for PyTorch's cumulative-average momentum).
Every key under the prefix must be used and every variable found with the
model's shape, else ValueError lists the missing, unused and misshapen keys.
Pure NumPy; torch is imported only to read files.

Command line: a main_moco checkpoint -> a complete MoCo workdir (config.json +
a step-0 checkpoint: the query encoder imported, the key encoder a copy of it,
a fresh queue and optimizer), which the linear probe (configs/*_linear.py,
--config.pretrained_workdir=DIR), `eval` and `main` (continued training) read:

  python -m nda_jax.importers.moco_pytorch --checkpoint=moco_v2_200ep_pretrain.pth.tar \
      --config=configs/imagenet_moco.py --workdir=runs/moco_v2_200ep
"""
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nda_jax import extras
from nda_jax.models import resnet

Variables = dict[str, Any]

# Flax module name -> torch module path, where they differ (models.resnet's names).
_MODULES = {"backbone": "", "head": "fc", "hidden": "0", "output": "2",
            "downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
           ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
           ("batch_stats", "var"): "running_var"}


def _torch_module(flax_modules: list[str]) -> list[str]:
  """['backbone', 'layer2_0', 'downsample_bn'] -> ['layer2', '0', 'downsample', '1']."""
  parts = []
  for name in flax_modules:
    name = _MODULES.get(name, re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", name))
    parts += name.split(".") if name else []
  return parts


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
  if key.endswith(".weight") and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if key.endswith(".weight") and value.ndim == 2:
    return value.T
  return value


def convert_encoder(state_dict: Mapping[str, Any],
                    encoder_module: resnet.MocoEncoder | resnet.ResNet,
                    prefix: str = "module.encoder_q.") -> Variables:
  """The `prefix` part of `state_dict` -> {'params', 'batch_stats'} of `encoder_module`.

  A `MocoEncoder` needs the MoCo MLP head (`fc.0`, `fc.2`); a `ResNet` takes
  the backbone and skips `fc.*` (module docstring).
  """
  arrays = {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}
  if not arrays:
    starts = sorted({k.split(".")[0] for k in state_dict})
    raise ValueError(f"no state_dict key starts with {prefix!r}; keys start with {starts}")
  skipped = ({k for k in arrays if k.startswith("fc.")}
             if isinstance(encoder_module, resnet.ResNet) else set())
  channels = arrays["conv1.weight"].shape[1] if "conv1.weight" in arrays else 3
  expected = jax.eval_shape(lambda: encoder_module.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, channels)), train=False))

  used, missing, misshapen = set(), [], []

  def convert(path, leaf):
    collection, *modules, name = [p.key for p in path]
    module = ".".join(_torch_module(modules))
    key = f"{module}.{_LEAVES[collection, name]}"
    if name == "mean" and f"{module}.num_batches_tracked" in arrays:
      used.add(f"{module}.num_batches_tracked")
    if key not in arrays:
      missing.append(prefix + key)
      return None
    used.add(key)
    value = _to_flax(key, arrays[key]).astype(np.float32)
    if value.shape != leaf.shape:
      misshapen.append(f"{prefix}{key}: {value.shape} (as Flax) != model's {leaf.shape}")
    return value

  variables = jax.tree_util.tree_map_with_path(convert, expected)
  unused = sorted(prefix + k for k in set(arrays) - used - skipped)
  if missing or unused or misshapen:
    hint = (" (a checkpoint without the MoCo MLP head converts into the backbone: pass "
            "encoder.backbone)" if any(k[len(prefix):].startswith("fc.") for k in missing) else "")
    raise ValueError(f"the state_dict does not fit {type(encoder_module).__name__} "
                     f"(check arch, stem, width, head_dim){hint}: missing keys {missing}; "
                     f"unused keys {unused}; shape mismatches {misshapen}")
  return jax.tree.map(jnp.asarray, variables)


def load_checkpoint(path: str) -> dict[str, np.ndarray]:
  """A main_moco / main_lincls checkpoint ('state_dict' entry) or a bare state_dict -> NumPy."""
  checkpoint = extras.read_torch_file(
      path, "a main_moco.py / main_lincls.py checkpoint or a state_dict saved with torch.save")
  torch = extras.require("torch", "torch")
  if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
    checkpoint = checkpoint["state_dict"]
  if not (isinstance(checkpoint, Mapping)
          and all(isinstance(v, torch.Tensor) for v in checkpoint.values())):
    raise ValueError(f"{path} holds neither a state_dict nor a checkpoint with a 'state_dict'")
  return {k: v.detach().cpu().numpy() for k, v in checkpoint.items()}


def moco_state(config: Any, variables: Variables) -> Any:
  """A step-0 MoCoState holding the imported query encoder; the key encoder starts as its
  copy, the queue and the optimizer state as in a new run."""
  from nda_jax.importers import save  # pylint: disable=g-import-not-at-top  (above trainers)
  from nda_jax.trainers import moco  # pylint: disable=g-import-not-at-top
  state = moco.MoCo(config).init_state(jax.random.PRNGKey(config.seed))
  params = save.check_like(variables["params"], state.params, "encoder params")
  stats = save.check_like(variables["batch_stats"], state.batch_stats, "encoder batch_stats")
  # Copies: a state is donated to the train step, so nothing in it may alias.
  return state.replace(params=params, batch_stats=stats,
                       key_params=jax.tree.map(jnp.copy, params),
                       key_batch_stats=jax.tree.map(jnp.copy, stats))


def import_moco(checkpoint: str, config: Any, workdir: str) -> None:
  """main_moco's `checkpoint` -> a MoCo workdir for `config` (ValueError / FileNotFoundError
  for a config that is not MoCo's, a missing file, an architecture that does not fit)."""
  from nda_jax.importers import save  # pylint: disable=g-import-not-at-top  (above trainers)
  from nda_jax.trainers import moco  # pylint: disable=g-import-not-at-top
  if config.get("trainer") != "moco":
    raise ValueError(f"the config trains {config.get('trainer')!r}; a MoCo checkpoint needs a "
                     f"MoCo config (configs/imagenet_moco.py)")
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint} does not exist")
  save.check_new_workdir(workdir, config)   # Before the conversion, which takes a while.
  variables = convert_encoder(load_checkpoint(checkpoint), moco.build_encoder(config))
  save.save_imported(workdir, config, moco_state(config, variables))


_PROG = "nda_jax.importers.moco_pytorch"


def main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)   # Orbax logs every file it touches at INFO.
  f = flags.FLAGS
  try:
    import_moco(f.checkpoint, f.config, f.workdir)
  except (ValueError, FileNotFoundError, ImportError) as e:
    cli.fail(_PROG, str(e))
  print(f"wrote config.json and a step-0 checkpoint of the imported query encoder to "
        f"{f.workdir}")


if __name__ == "__main__":
  # Flags are defined only when run as a command, so importing this module
  # next to other commands' modules cannot clash on flag names.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("checkpoint", None, "main_moco.py checkpoint (.pth.tar).", required=True)
  flags.DEFINE_string("workdir", None, "The new MoCo workdir to write.", required=True)
  _CONFIG = config_flags.DEFINE_config_file("config", None,
                                            "MoCo config of the checkpoint's encoder "
                                            "(configs/imagenet_moco.py).")
  flags.mark_flag_as_required("config")
  cli.run(main, _PROG, _CONFIG)
