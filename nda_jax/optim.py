"""Optimizers from a config, built in this one place with optax.

The recipes this package reproduces were written for PyTorch, so `build` follows
PyTorch's update rules exactly rather than optax's defaults:

* MoCo (`main_moco.py`: SGD, momentum 0.9, weight_decay 1e-4, `--cos`;
  `main_lincls.py`: SGD lr 30, lr x0.1 at epochs 60 and 80 of 100) and DPC
  (Adam with weight_decay; fine-tuning decays at epochs 60/80/100) use
  `torch.optim.SGD` / `torch.optim.Adam` with `weight_decay`, which is *coupled*:
  `grad += wd * param` before momentum or Adam's moments.
* BigGAN-PyTorch (the NDA-GAN) uses `Adam(betas=(0, 0.999), eps=1e-8)`; with b1=0
  and the other keys at their defaults `build` is `optax.adam(lr, b1=0, b2=0.999,
  eps=1e-8)` itself (the same transformations: the same state tree, bit-identical
  updates).

Every key is declared by `default_config`, so `--config.optim.x=...` overrides
work under a locked config. The one exception is adding keys to `lr_mults`:
config_flags cannot create a key (locked or not, it looks up the field's type),
so `--config.optim.lr_mults.backbone=0.1` fails with AttributeError unless the
config file already declares `backbone` (e.g. `lr_mults = {'backbone': 1.0}`);
replacing the whole mapping always works:
`--config.optim.lr_mults="{'backbone': 0.1}"`. Tuples, not lists, can be
overridden from the command line: `--config.optim.boundaries_epochs=60,80`.

With `weight_decay > 0` the transformation needs the parameters:
`tx.update(grads, opt_state, params)`.
"""
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

KINDS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "cosine_epochs", "steps")


def default_config(kind: str = "adam") -> ml_collections.ConfigDict:
  """Every key `build` reads; torch.optim's defaults where it has them (lr: Adam's 1e-3, SGD's common 0.1)."""
  if kind not in KINDS:
    raise ValueError(f"optimizer kind {kind!r} is unknown; valid choices: {KINDS}")
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.lr = 1e-3 if kind == "adam" else 0.1
  c.b1 = 0.9                      # adam
  c.b2 = 0.999                    # adam
  c.eps = 1e-8                    # adam
  c.momentum = 0.9                # sgd; 0: plain SGD
  c.nesterov = False              # sgd
  c.weight_decay = 0.0
  c.decoupled_wd = False          # False: torch's weight_decay; True: AdamW-style
  c.schedule = "constant"         # 'constant' | 'cosine' | 'cosine_epochs' | 'steps'
  c.warmup_epochs = 0.0           # linear warmup from 0, before any schedule
  c.boundaries_epochs = ()        # 'steps': lr *= decay_factor at each of these epochs
  c.decay_factor = 0.1            # 'steps'
  c.lr_mults = ml_collections.ConfigDict()  # top-level param key -> lr multiplier
  c.clip_norm = 0.0               # > 0: clip the gradients' global norm first
  return c


def validate(cfg: ml_collections.ConfigDict, where: str) -> None:
  """Raises ValueError with one sentence naming `where` ('config.optim.encoder') and the valid choices."""
  declared = set(default_config().keys())
  keys = set(cfg.keys())
  if keys - declared:
    raise ValueError(f"{where} has unknown key(s) {sorted(keys - declared)}; valid keys: {sorted(declared)}")
  if declared - keys:
    raise ValueError(f"{where} lacks key(s) {sorted(declared - keys)}; "
                     "build it from nda_jax.optim.default_config()")
  if cfg.kind not in KINDS:
    raise ValueError(f"{where}.kind={cfg.kind!r} is unknown; valid choices: {KINDS}")
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"{where}.schedule={cfg.schedule!r} is unknown; valid choices: {SCHEDULES}")
  if not cfg.lr > 0:
    raise ValueError(f"{where}.lr={cfg.lr} must be > 0")
  for name in ("b1", "b2", "momentum"):
    if not 0 <= cfg[name] < 1:
      raise ValueError(f"{where}.{name}={cfg[name]} must be in [0, 1)")
  if cfg.nesterov and (cfg.kind != "sgd" or cfg.momentum == 0):
    raise ValueError(f"{where}.nesterov=True needs kind 'sgd' with momentum > 0 (as torch.optim.SGD), "
                     f"got kind {cfg.kind!r} with momentum {cfg.momentum}")
  for name in ("eps", "weight_decay", "warmup_epochs", "clip_norm"):
    if not cfg[name] >= 0:
      raise ValueError(f"{where}.{name}={cfg[name]} must be >= 0")
  if not cfg.decay_factor > 0:
    raise ValueError(f"{where}.decay_factor={cfg.decay_factor} must be > 0")
  bounds = tuple(cfg.boundaries_epochs)
  if bounds and cfg.schedule != "steps":
    raise ValueError(f"{where}.boundaries_epochs={bounds} is only read by schedule 'steps', "
                     f"not {cfg.schedule!r}; set schedule='steps' or boundaries_epochs=()")
  if any(not b > 0 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
    raise ValueError(f"{where}.boundaries_epochs={bounds} must be positive and strictly increasing")
  for key, mult in cfg.lr_mults.items():
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult < 0:
      raise ValueError(f"{where}.lr_mults.{key}={mult!r} must be a number >= 0")


def _to_steps(epochs: float, steps_per_epoch: int) -> int:
  return int(round(epochs * steps_per_epoch))


def _schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int,
              where: str) -> optax.Schedule:
  """The schedule of an already validated `cfg`; elementwise on arrays of step counts."""
  if steps_per_epoch < 1 or total_steps < 1:
    raise ValueError(f"{where} needs steps_per_epoch >= 1 and total_steps >= 1, "
                     f"got {steps_per_epoch} and {total_steps}")
  lr = float(cfg.lr)
  warmup = _to_steps(cfg.warmup_epochs, steps_per_epoch)
  if warmup >= total_steps:
    raise ValueError(f"{where}.warmup_epochs={cfg.warmup_epochs} is {warmup} steps, "
                     f"which must be fewer than total_steps={total_steps}")

  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=total_steps - warmup)
  elif cfg.schedule == "cosine_epochs":   # MoCo's --cos: the curve's value set once per epoch
    cosine = optax.cosine_decay_schedule(lr, decay_steps=total_steps - warmup)
    main = lambda step: cosine(step // steps_per_epoch * steps_per_epoch)
  else:  # 'steps': decayed from the first step of each boundary epoch, as main_lincls.
    scales = {}    # step (counted from the warmup's end) -> factor; equal steps compound
    for epoch in cfg.boundaries_epochs:
      step = _to_steps(epoch, steps_per_epoch) - warmup
      scales[step] = scales.get(step, 1.0) * float(cfg.decay_factor)
    main = optax.piecewise_constant_schedule(lr, scales)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def learning_rate_schedule(cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int,
                           where: str = "config.optim") -> optax.Schedule:
  """Step count -> the base learning rate `build` applies (before `lr_mults`), for logging.

  A linear warmup from 0 over `warmup_epochs` (so step 0 makes no update), then:
  'constant': lr; 'cosine': lr * 0.5 * (1 + cos(pi * t / T)) down to 0 over the
  remaining T steps; 'cosine_epochs': the same curve with t rounded down to its
  epoch's first step (main_moco's --cos, lr * 0.5 * (1 + cos(pi * epoch / epochs)));
  'steps': lr * decay_factor ** (boundaries passed), a boundary epoch e being
  passed from step round(e * steps_per_epoch) on.
  """
  validate(cfg, where)
  return _schedule(cfg, steps_per_epoch, total_steps, where)


def _scale_top_level(mults: dict[str, float], where: str) -> optax.GradientTransformation:
  """Multiplies each top-level subtree's update by its multiplier (default 1).

  Applied to the final update, so a group's whole step -- weight decay included,
  coupled or decoupled -- scales with its lr, as in a torch param group with lr * m.
  """

  def check(tree: Any) -> None:
    if not isinstance(tree, Mapping):
      raise ValueError(f"{where} needs parameters that map top-level keys to subtrees, "
                       f"got a {type(tree).__name__}")
    unknown = sorted(set(mults) - set(tree))
    if unknown:
      raise ValueError(f"{where} names {unknown}, which are not top-level keys of the parameters; "
                       f"valid choices: {sorted(tree)}")

  def init_fn(params):
    check(params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    check(updates)
    scaled = {k: v if mults.get(k, 1.0) == 1.0 else jax.tree.map(lambda u, m=mults[k]: u * m, v)
              for k, v in updates.items()}
    return type(updates)(scaled), state

  return optax.GradientTransformation(init_fn, update_fn)


def build(cfg: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int,
          where: str = "config.optim") -> optax.GradientTransformation:
  """The optimizer `cfg` describes; `where` names `cfg` in error messages.

  The chain: clip_by_global_norm (clip_norm > 0); coupled weight decay
  (grad += wd * param, torch's `weight_decay`); Adam's moments or SGD's momentum
  buffer (buf = momentum * buf + grad, step = buf or, nesterov, grad + momentum
  * buf: torch.optim.SGD with dampening 0); decoupled weight decay (+ wd * param,
  AdamW / optax.adamw); -lr(step); the `lr_mults` of the top-level param groups.
  """
  validate(cfg, where)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.weight_decay > 0 and not cfg.decoupled_wd:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  if cfg.kind == "adam":
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  elif cfg.momentum > 0:
    parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
  if cfg.weight_decay > 0 and cfg.decoupled_wd:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  schedule = _schedule(cfg, steps_per_epoch, total_steps, where)
  constant = cfg.schedule == "constant" and _to_steps(cfg.warmup_epochs, steps_per_epoch) == 0
  # A constant lr as a number: no step count in the state, exactly optax.adam's state tree.
  parts.append(optax.scale_by_learning_rate(float(cfg.lr) if constant else schedule))
  if cfg.lr_mults:  # even all 1: its init checks that the keys name parameters
    mults = {k: float(m) for k, m in cfg.lr_mults.items()}
    parts.append(_scale_top_level(mults, f"{where}.lr_mults"))
  return optax.chain(*parts)
