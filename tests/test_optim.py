"""optim.build against NumPy re-implementations of torch.optim's update rules, and its schedules."""
import math

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import pytest

from nda_jax import optim

NUM_STEPS = 5


def make_params():
  rng = np.random.RandomState(0)
  return {"backbone": {"w": rng.randn(3, 4).astype(np.float32), "b": rng.randn(4).astype(np.float32)},
          "head": {"w": rng.randn(4, 2).astype(np.float32)}}


def grad_of(p):
  """A gradient that depends on the parameters (so weight decay and momentum interact)."""
  return np.sin(3 * p) + 0.5 * p ** 2 - 0.3


def config(kind, **overrides):
  cfg = optim.default_config(kind)
  cfg.update(overrides)
  return cfg


def run_optax(tx, params, num_steps=NUM_STEPS):
  """`num_steps` updates with grads from `grad_of`; returns params and the per-step updates."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for _ in range(num_steps):
    grads = jax.tree.map(lambda p: jnp.asarray(grad_of(np.asarray(p))), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(jax.device_get(updates))
  return jax.device_get(params), history


def torch_sgd(p, lrs, *, momentum, nesterov, wd, decoupled=False):
  """torch.optim.SGD (dampening 0) on one array; `decoupled`: p -= lr * wd * p outside the momentum."""
  p, buf = p.astype(np.float64), None
  for lr in lrs:
    d_p = grad_of(p)
    if not decoupled:
      d_p = d_p + wd * p
    if momentum:
      buf = d_p.copy() if buf is None else momentum * buf + d_p
      d_p = d_p + momentum * buf if nesterov else buf
    if decoupled:
      d_p = d_p + wd * p
    p = p - lr * d_p
  return p


def torch_adam(p, lr, *, b1, b2, eps, wd):
  """torch.optim.Adam with its (coupled) weight_decay on one array."""
  p = p.astype(np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t in range(1, NUM_STEPS + 1):
    g = grad_of(p) + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps
    p = p - lr / (1 - b1 ** t) * m / denom
  return p


def assert_trees_close(actual, expected, rtol=2e-5, atol=2e-6):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol), actual, expected)


@pytest.mark.parametrize("momentum,nesterov,wd,decoupled", [
    (0.9, False, 0.05, False), (0.9, True, 0.05, False), (0.0, False, 0.1, False), (0.9, False, 0.05, True)])
def test_sgd_matches_torch(momentum, nesterov, wd, decoupled):
  cfg = config("sgd", lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd, decoupled_wd=decoupled)
  params = make_params()
  actual, _ = run_optax(optim.build(cfg, steps_per_epoch=10, total_steps=100), params)
  expected = jax.tree.map(lambda p: torch_sgd(p, [0.1] * NUM_STEPS, momentum=momentum, nesterov=nesterov,
                                              wd=wd, decoupled=decoupled), params)
  assert_trees_close(actual, expected)


def test_sgd_steps_schedule_matches_torch_lr_sequence():
  # Boundaries at epochs 0.4 and 0.6 of 5-step epochs: lr drops before steps 2 and 3.
  cfg = config("sgd", lr=0.5, weight_decay=0.01, schedule="steps", boundaries_epochs=(0.4, 0.6),
               decay_factor=0.2)
  params = make_params()
  actual, _ = run_optax(optim.build(cfg, steps_per_epoch=5, total_steps=NUM_STEPS), params)
  lrs = [0.5 * 0.2 ** ((t >= 2) + (t >= 3)) for t in range(NUM_STEPS)]
  expected = jax.tree.map(lambda p: torch_sgd(p, lrs, momentum=0.9, nesterov=False, wd=0.01), params)
  assert_trees_close(actual, expected)


def test_adam_coupled_weight_decay_matches_torch():
  cfg = config("adam", lr=0.01, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1)
  params = make_params()
  actual, _ = run_optax(optim.build(cfg, steps_per_epoch=10, total_steps=100), params)
  expected = jax.tree.map(lambda p: torch_adam(p, 0.01, b1=0.8, b2=0.99, eps=1e-6, wd=0.1), params)
  assert_trees_close(actual, expected)


def test_adam_decoupled_weight_decay_is_adamw():
  cfg = config("adam", lr=0.01, b1=0.8, b2=0.99, weight_decay=0.3, decoupled_wd=True)
  params = make_params()
  actual, _ = run_optax(optim.build(cfg, steps_per_epoch=10, total_steps=100), params)
  expected, _ = run_optax(optax.adamw(0.01, b1=0.8, b2=0.99, eps=1e-8, weight_decay=0.3), params)
  assert_trees_close(actual, expected, rtol=1e-6, atol=1e-7)
  coupled, _ = run_optax(optim.build(config("adam", lr=0.01, b1=0.8, b2=0.99, weight_decay=0.3),
                                     steps_per_epoch=10, total_steps=100), params)
  assert not np.allclose(coupled["head"]["w"], actual["head"]["w"], rtol=1e-4)


def test_gan_adam_is_bit_identical_to_optax_adam():
  cfg = config("adam", lr=2e-4, b1=0.0, b2=0.999, eps=1e-8)
  tx = optim.build(cfg, steps_per_epoch=195, total_steps=97_500)
  reference = optax.adam(2e-4, b1=0.0, b2=0.999, eps=1e-8)
  params = make_params()
  assert (jax.tree.structure(tx.init(params)) == jax.tree.structure(reference.init(params)))
  actual, actual_updates = run_optax(tx, params)
  expected, expected_updates = run_optax(reference, params)
  jax.tree.map(np.testing.assert_array_equal, (actual, actual_updates), (expected, expected_updates))


def test_cosine_schedule_with_warmup():
  lr, spe, total, warmup = 0.5, 10, 100, 20
  cfg = config("sgd", lr=lr, schedule="cosine", warmup_epochs=2.0)
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=spe, total_steps=total)
  steps = np.array([0, 1, 10, 19, 20, 21, 60, 99, 100, 150])
  closed = [lr * t / warmup if t < warmup
            else lr * 0.5 * (1 + math.cos(math.pi * min(t - warmup, total - warmup) / (total - warmup)))
            for t in steps]
  np.testing.assert_allclose(np.asarray(schedule(steps)), closed, rtol=1e-6, atol=1e-7)
  assert [float(schedule(t)) for t in (0, 20, 60, 100)] == pytest.approx([0.0, lr, lr / 2, 0.0], abs=1e-7)


def test_steps_schedule_at_boundaries():
  # main_lincls: lr 30, x0.1 at epochs 60 and 80.
  cfg = config("sgd", lr=30.0, schedule="steps", boundaries_epochs=(60, 80))
  spe = 7
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=spe, total_steps=100 * spe)
  steps = np.array([0, 60 * spe - 1, 60 * spe, 80 * spe - 1, 80 * spe, 100 * spe - 1])
  closed = [30.0 * 0.1 ** sum(t >= b * spe for b in (60, 80)) for t in steps]
  np.testing.assert_allclose(np.asarray(schedule(steps)), closed, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(0)), 30.0)


def test_steps_schedule_with_warmup_counts_boundaries_from_step_zero():
  lr, spe, warmup = 30.0, 7, 5 * 7
  cfg = config("sgd", lr=lr, schedule="steps", boundaries_epochs=(60, 80), warmup_epochs=5.0)
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=spe, total_steps=100 * spe)
  steps = np.array([0, 1, warmup - 1, warmup, warmup + 1, 60 * spe - 1, 60 * spe, 80 * spe - 1,
                    80 * spe, 100 * spe])
  closed = [lr * t / warmup if t < warmup else lr * 0.1 ** sum(t >= b * spe for b in (60, 80))
            for t in steps]
  np.testing.assert_allclose(np.asarray(schedule(steps)), closed, rtol=1e-6, atol=1e-6)


def test_constant_schedule_with_warmup_and_boundaries_on_one_step():
  schedule = optim.learning_rate_schedule(config("adam", lr=0.2, warmup_epochs=1.0),
                                          steps_per_epoch=4, total_steps=12)
  np.testing.assert_allclose(np.asarray(schedule(np.arange(6))), [0, 0.05, 0.1, 0.15, 0.2, 0.2],
                             rtol=1e-6, atol=1e-7)
  # Epochs 1.0 and 1.1 of 4 steps both round to step 4: the two decays compound there.
  cfg = config("sgd", lr=1.0, schedule="steps", boundaries_epochs=(1.0, 1.1), decay_factor=0.5)
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=4, total_steps=12)
  np.testing.assert_allclose(np.asarray(schedule(np.array([3, 4, 11]))), [1.0, 0.25, 0.25])


def test_cosine_epochs_schedule_is_set_once_per_epoch_after_warmup():
  """main_moco's adjust_learning_rate (--cos): lr * 0.5 * (1 + cos(pi * e / E)), e the epoch
  counted from the warmup's end, constant within it."""
  lr, spe, total, warmup = 0.5, 10, 100, 20
  cfg = config("sgd", lr=lr, schedule="cosine_epochs", warmup_epochs=2.0)
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=spe, total_steps=total)
  steps = np.array([0, 1, 19, 20, 21, 29, 30, 59, 60, 99])
  epochs_after = (total - warmup) // spe
  closed = [lr * t / warmup if t < warmup
            else lr * 0.5 * (1 + math.cos(math.pi * ((t - warmup) // spe) / epochs_after))
            for t in steps]
  np.testing.assert_allclose(np.asarray(schedule(steps)), closed, rtol=1e-6, atol=1e-7)


def test_cosine_epochs_schedule_drives_the_update():
  cfg = config("sgd", lr=0.4, momentum=0.0, schedule="cosine_epochs")
  params = make_params()
  _, updates = run_optax(optim.build(cfg, steps_per_epoch=2, total_steps=8), params, num_steps=4)
  p = params["head"]["w"]
  for t, u in enumerate(updates):
    lr = 0.4 * 0.5 * (1 + math.cos(math.pi * (t // 2) / 4))
    np.testing.assert_allclose(u["head"]["w"], -lr * grad_of(p), rtol=1e-5, atol=1e-7)
    p = p + u["head"]["w"]


def test_schedule_drives_the_update():
  cfg = config("sgd", lr=0.4, momentum=0.0, schedule="cosine", warmup_epochs=0.5)
  spe, total = 4, 8
  params = make_params()
  _, updates = run_optax(optim.build(cfg, steps_per_epoch=spe, total_steps=total), params, num_steps=4)
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=spe, total_steps=total)
  p = params["head"]["w"]
  for t, u in enumerate(updates):
    np.testing.assert_allclose(u["head"]["w"], -float(schedule(t)) * grad_of(p), rtol=1e-5, atol=1e-7)
    p = p + u["head"]["w"]
  assert not np.any(updates[0]["head"]["w"])  # warmup starts at lr 0


def test_clip_norm_clips_the_gradient_before_weight_decay():
  """torch.nn.utils.clip_grad_norm_ on the gradients, then SGD's step with its coupled weight decay."""
  cfg = config("sgd", lr=0.1, momentum=0.0, weight_decay=0.5, clip_norm=0.3)
  params = make_params()
  _, (updates,) = run_optax(optim.build(cfg, steps_per_epoch=1, total_steps=10), params, num_steps=1)
  grads = jax.tree.map(lambda p: grad_of(p.astype(np.float64)), params)
  norm = math.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
  assert norm > 0.3
  expected = jax.tree.map(lambda g, p: -0.1 * (g * 0.3 / norm + 0.5 * p), grads, params)
  assert_trees_close(updates, expected)


def test_lr_mults_scale_the_backbone_update():
  params = make_params()
  plain = optim.build(config("sgd", lr=0.1, momentum=0.0), steps_per_epoch=1, total_steps=10)
  cfg = config("sgd", lr=0.1, momentum=0.0)
  cfg.lr_mults = {"backbone": 0.1}
  scaled = optim.build(cfg, steps_per_epoch=1, total_steps=10)
  _, (base,) = run_optax(plain, params, num_steps=1)
  _, (mult,) = run_optax(scaled, params, num_steps=1)
  assert_trees_close(mult["backbone"], jax.tree.map(lambda u: 0.1 * u, base["backbone"]), rtol=1e-6, atol=0)
  jax.tree.map(np.testing.assert_array_equal, mult["head"], base["head"])


def test_lr_mults_scale_a_whole_param_group_like_torch():
  """A torch param group with lr * 0.1: momentum and coupled weight decay, all 5 steps."""
  cfg = config("sgd", lr=0.1, weight_decay=0.05)
  cfg.lr_mults = {"backbone": 0.1}
  params = make_params()
  actual, _ = run_optax(optim.build(cfg, steps_per_epoch=10, total_steps=100), params)
  expected = {name: jax.tree.map(lambda p, m=m: torch_sgd(p, [0.1 * m] * NUM_STEPS, momentum=0.9,
                                                          nesterov=False, wd=0.05), params[name])
              for name, m in (("backbone", 0.1), ("head", 1.0))}
  assert_trees_close(actual, expected)


def test_lr_mults_unknown_key_names_the_path():
  cfg = config("sgd")
  cfg.lr_mults = {"backbon": 0.1}
  tx = optim.build(cfg, steps_per_epoch=1, total_steps=10, where="config.optim.encoder")
  pattern = r"config\.optim\.encoder\.lr_mults .*'backbon'.*\['backbone', 'head'\]"
  with pytest.raises(ValueError, match=pattern):
    tx.init(make_params())


def test_lr_mults_on_a_locked_config_from_the_command_line():
  """The documented overrides: replace the whole mapping, or set a key the config already declares."""
  def parse(arg, lr_mults=None):
    argv = ["prog", arg]
    cfg = optim.default_config("sgd")
    if lr_mults is not None:
      cfg.lr_mults = lr_mults
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", cfg, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config

  cfg = parse("--config.lr_mults={'backbone': 0.1, 'head': 2}")
  assert dict(cfg.lr_mults) == {"backbone": 0.1, "head": 2}
  optim.validate(cfg, "config")
  assert dict(parse("--config.lr_mults.backbone=0.1", {"backbone": 1.0}).lr_mults) == {"backbone": 0.1}
  with pytest.raises(AttributeError, match="backbone"):
    parse("--config.lr_mults.backbone=0.1")


@pytest.mark.parametrize("overrides,pattern", [
    (dict(kind="rmsprop"), r"config\.optim\.encoder\.kind='rmsprop' .*\('adam', 'sgd'\)"),
    (dict(schedule="linear"),
     r"config\.optim\.encoder\.schedule='linear' .*\('constant', 'cosine', 'cosine_epochs', 'steps'\)"),
    (dict(lr=0.0), r"config\.optim\.encoder\.lr=0\.0 must be > 0"),
    (dict(weight_decay=-1e-4), r"config\.optim\.encoder\.weight_decay=-0\.0001 must be >= 0"),
    (dict(momentum=1.0), r"config\.optim\.encoder\.momentum=1\.0 must be in \[0, 1\)"),
    (dict(schedule="steps", boundaries_epochs=(80, 60)),
     r"config\.optim\.encoder\.boundaries_epochs=\(80, 60\) .*strictly increasing"),
    (dict(boundaries_epochs=(60, 80)), r"config\.optim\.encoder\.boundaries_epochs=.*schedule='steps'"),
    (dict(nesterov=True, momentum=0.0),
     r"config\.optim\.encoder\.nesterov=True needs kind 'sgd' with momentum"),
    (dict(lr_mults={"backbone": -1.0}), r"config\.optim\.encoder\.lr_mults\.backbone=-1\.0 must be"),
])
def test_validate_names_the_path_and_choices(overrides, pattern):
  cfg = config("sgd")
  for key, value in overrides.items():
    cfg[key] = value
  with pytest.raises(ValueError, match=pattern) as error:
    optim.validate(cfg, "config.optim.encoder")
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match=pattern):
    optim.build(cfg, steps_per_epoch=10, total_steps=100, where="config.optim.encoder")


def test_validate_unknown_and_missing_keys():
  cfg = config("adam")
  cfg.betas = (0.0, 0.999)
  with pytest.raises(ValueError, match=r"config\.optim has unknown key\(s\) \['betas'\]; valid keys: .*'b1'"):
    optim.validate(cfg, "config.optim")
  cfg = config("adam")
  del cfg["clip_norm"]
  with pytest.raises(ValueError, match=r"config\.optim lacks key\(s\) \['clip_norm'\]"):
    optim.validate(cfg, "config.optim")


def test_warmup_longer_than_training_is_rejected():
  cfg = config("adam", schedule="cosine", warmup_epochs=10.0)
  with pytest.raises(ValueError, match=r"config\.optim\.warmup_epochs=10\.0 is 100 steps.*total_steps=50"):
    optim.build(cfg, steps_per_epoch=10, total_steps=50)


def test_default_configs_build_and_switch_kind_when_locked():
  for kind in optim.KINDS:
    cfg = optim.default_config(kind)
    cfg.lock()
    cfg.kind = "sgd" if kind == "adam" else "adam"
    params = make_params()
    _, (updates,) = run_optax(optim.build(cfg, steps_per_epoch=1, total_steps=1), params, num_steps=1)
    assert all(np.all(np.isfinite(u)) and np.any(u) for u in jax.tree.leaves(updates))
