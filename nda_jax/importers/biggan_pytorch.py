"""Official BigGAN-PyTorch / ermongroup/NDA weights -> Flax variables of `models.biggan`.

The released NDA checkpoints are PyTorch `state_dict`s of `BigGAN_new.Generator`
(`G.pth`, `G_ema.pth`) and `Discriminator` (`D.pth`). The conversion is pure
NumPy; torch is imported only to read `.pth` files.

Layout differences handled here:
- conv weights OIHW -> HWIO, linear weights [out, in] -> [in, out];
- G's first linear layer is reshaped to NCHW in PyTorch and to NHWC here, so
  its output units (weight rows, bias, SN `u`) are permuted (c, h, w) -> (h, w, c);
- D's SN embedding is stored transposed (`ClassEmbed`), so its weight is too.
The SN vector `u` sits on the output side in both frameworks (and on the class
side for the embedding), and permuting the flattened input side does not change
the power iteration, so `u` and `sv` are carried over as the same numbers.

Every key of the state_dict must be used and every Flax variable filled, else
ValueError names the offending keys.

Usage:
  python -m nda_jax.importers.biggan_pytorch --G=G_ema.pth --D=D.pth \
      --config=configs/cifar10_nda_gan.py:cond --workdir=DIR [--G_ema=G_ema.pth]
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nda_jax import cli
from nda_jax import extras
from nda_jax.models import biggan

Variables = dict[str, Any]


class _StateDict:
  """A state_dict that records which keys were read, to reject leftovers."""

  def __init__(self, state_dict: Mapping[str, Any], what: str):
    self._arrays = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    self._used: set[str] = set()
    self._what = what

  def take(self, key: str) -> np.ndarray:
    if key not in self._arrays:
      raise ValueError(f"{self._what}: state_dict has no key {key!r}; is it a BigGAN_new "
                       f"state_dict of this architecture (ch, resolution, n_classes)?")
    self._used.add(key)
    return self._arrays[key]

  def check_all_used(self) -> None:
    leftover = sorted(set(self._arrays) - self._used)
    if leftover:
      raise ValueError(f"{self._what}: state_dict keys not used by the Flax model: {leftover}; "
                       f"the checkpoint has layers this config does not (check ch, resolution, "
                       f"n_classes, attention)")


def _sn_layer(sd: _StateDict, prefix: str, name: str, params: dict, stats: dict,
              param_name: str = "kernel", out_perm: np.ndarray | None = None) -> None:
  """Fills params[name] and stats[name + '_sn'] from a BigGAN-PyTorch SN layer at `prefix`."""
  weight = sd.take(f"{prefix}.weight")
  u = sd.take(f"{prefix}.u0").reshape(1, -1)
  if out_perm is not None:
    if weight.shape[0] != out_perm.size:
      raise ValueError(f"{prefix}.weight has {weight.shape[0]} outputs, the model expects "
                       f"{out_perm.size}: check ch and bottom_width")
    weight, u = weight[out_perm], u[:, out_perm]
  kernel = weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T
  params[name] = {param_name: kernel}
  if param_name == "kernel":
    bias = sd.take(f"{prefix}.bias")
    params[name]["bias"] = bias if out_perm is None else bias[out_perm]
  stats[f"{name}_sn"] = {"u": u, "sigma": sd.take(f"{prefix}.sv0").reshape(())}


def _running_stats(sd: _StateDict, prefix: str) -> dict:
  return {"mean": sd.take(f"{prefix}.stored_mean"), "var": sd.take(f"{prefix}.stored_var")}


def _nchw_to_nhwc_units(channels: int, width: int) -> np.ndarray:
  """perm[j] = PyTorch unit (c, h, w) that is Flax unit j = (h, w, c)."""
  return np.arange(channels * width * width).reshape(channels, width, width).transpose(1, 2, 0).ravel()


def _check_against(variables: Variables, module: Any, example_args: tuple, what: str) -> Variables:
  """Converted variables must match the module's own tree exactly (names and shapes)."""
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args, train=False))
  got_flat = {jax.tree_util.keystr(p): np.shape(v) for p, v in
              jax.tree_util.tree_flatten_with_path(variables)[0]}
  want_flat = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
               jax.tree_util.tree_flatten_with_path(expected)[0]}
  problems = [f"missing {k} {s}" for k, s in want_flat.items() if k not in got_flat]
  problems += [f"unexpected {k} {s}" for k, s in got_flat.items() if k not in want_flat]
  problems += [f"{k}: converted shape {got_flat[k]} != model shape {s}"
               for k, s in want_flat.items() if k in got_flat and got_flat[k] != s]
  if problems:
    raise ValueError(f"{what}: converted weights do not fit the model: " + "; ".join(problems))
  return jax.tree.map(jnp.asarray, variables)


def convert_generator(state_dict: Mapping[str, Any], generator: biggan.Generator) -> Variables:
  """A `BigGAN_new.Generator` state_dict -> {'params', 'batch_stats'} for `generator`."""
  sd = _StateDict(state_dict, "Generator")
  arch = biggan.generator_arch(generator.resolution)
  params, stats = {}, {}
  width0 = generator.ch * arch["in_mult"][0]
  _sn_layer(sd, "linear", "linear", params, stats,
            out_perm=_nchw_to_nhwc_units(width0, generator.bottom_width))
  for i, (in_mult, out_mult) in enumerate(zip(arch["in_mult"], arch["out_mult"])):
    prefix, block_params, block_stats = f"blocks.{i}.0", {}, {}
    for conv in ("conv1", "conv2", "conv_sc"):  # every G block up-samples: conv_sc always exists
      _sn_layer(sd, f"{prefix}.{conv}", conv, block_params, block_stats)
    for bn in ("bn1", "bn2"):
      block_params[bn] = {"gain": {"embedding": sd.take(f"{prefix}.{bn}.gain.weight")},
                          "bias": {"embedding": sd.take(f"{prefix}.{bn}.bias.weight")}}
      block_stats[bn] = _running_stats(sd, f"{prefix}.{bn}")
    params[f"blocks_{i}"], stats[f"blocks_{i}"] = block_params, block_stats
  params["output_bn"] = {"scale": sd.take("output_layer.0.gain"),
                         "bias": sd.take("output_layer.0.bias")}
  stats["output_bn"] = _running_stats(sd, "output_layer.0")
  _sn_layer(sd, "output_layer.2", "output_conv", params, stats)
  sd.check_all_used()
  example = (jnp.zeros((1, generator.dim_z)), jnp.zeros((1,), jnp.int32))
  return _check_against({"params": params, "batch_stats": stats}, generator, example, "Generator")


def convert_discriminator(state_dict: Mapping[str, Any],
                          discriminator: biggan.Discriminator) -> Variables:
  """A `BigGAN_new.Discriminator` state_dict -> {'params', 'batch_stats'} for `discriminator`."""
  sd = _StateDict(state_dict, "Discriminator")
  arch = biggan.discriminator_arch(discriminator.resolution)
  params, stats = {}, {}
  in_features = discriminator.in_channels
  for i, (mult, down) in enumerate(zip(arch["out_mult"], arch["downsample"])):
    features = discriminator.ch * mult
    convs = ("conv1", "conv2") + (("conv_sc",) if down or in_features != features else ())
    block_params, block_stats = {}, {}
    for conv in convs:
      _sn_layer(sd, f"blocks.{i}.0.{conv}", conv, block_params, block_stats)
    params[f"blocks_{i}"], stats[f"blocks_{i}"] = block_params, block_stats
    in_features = features
  _sn_layer(sd, "linear", "linear", params, stats)
  _sn_layer(sd, "embed", "embed", params, stats, param_name="embedding")
  sd.check_all_used()
  res = discriminator.resolution
  example = (jnp.zeros((1, res, res, discriminator.in_channels)), jnp.zeros((1,), jnp.int32))
  return _check_against({"params": params, "batch_stats": stats}, discriminator, example,
                        "Discriminator")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.pth` state_dict into NumPy arrays (needs torch)."""
  state_dict = extras.read_torch_file(path, "a state_dict saved with torch.save")
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def gan_state(config, generator_vars: Variables, discriminator_vars: Variables,
              ema_generator_vars: Variables | None = None):
  """A step-0 GAN TrainState holding the imported weights; optimizer states start fresh."""
  from nda_jax.importers import save  # pylint: disable=g-import-not-at-top
  from nda_jax.trainers import gan  # pylint: disable=g-import-not-at-top
  method = gan.GAN(config)
  state = method.init_state(jax.random.PRNGKey(config.seed))
  ema = ema_generator_vars or generator_vars
  return state.replace(
      g_params=save.check_like(generator_vars["params"], state.g_params, "G params"),
      g_stats=save.check_like(generator_vars["batch_stats"], state.g_stats, "G batch_stats"),
      d_params=save.check_like(discriminator_vars["params"], state.d_params, "D params"),
      d_stats=save.check_like(discriminator_vars["batch_stats"], state.d_stats,
                              "D batch_stats"),
      ema_params=save.check_like(ema["params"], state.ema_params, "G_ema params"),
      ema_stats=save.check_like(ema["batch_stats"], state.ema_stats, "G_ema batch_stats"))


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from nda_jax.importers import save  # pylint: disable=g-import-not-at-top
  from nda_jax.trainers import gan  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    save.check_new_workdir(f.workdir, f.config)   # Before the conversion, which takes a while.
    generator, discriminator = gan.build_models(f.config, axis_name=None)
    g_vars = convert_generator(load_state_dict(f.G), generator)
    ema_vars = convert_generator(load_state_dict(f.G_ema), generator) if f.G_ema else g_vars
    d_vars = convert_discriminator(load_state_dict(f.D), discriminator)
    save.save_imported(f.workdir, f.config, gan_state(f.config, g_vars, d_vars, ema_vars))
  except (ValueError, FileNotFoundError) as e:
    cli.fail("nda_jax.importers.biggan_pytorch", str(e))
  print(f"wrote a step-0 checkpoint and config.json to {f.workdir}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("G", None, "Generator state_dict (.pth); G_ema.pth for sampling.", required=True)
  flags.DEFINE_string("D", None, "Discriminator state_dict (.pth).", required=True)
  flags.DEFINE_string("G_ema", None, "EMA generator state_dict; defaults to --G.")
  flags.DEFINE_string("workdir", None, "Where to write the Orbax checkpoint.", required=True)
  config = config_flags.DEFINE_config_file("config", None,
                                           "Experiment config (configs/*.py[:variant]).")
  flags.mark_flag_as_required("config")
  cli.run(main, "nda_jax.importers.biggan_pytorch", config)
