r"""Where one and eight devices part: every quantity of one MoCo step and one GAN iteration.

  python bench/device_drift.py [--methods=moco,gan] [--precisions=float32,float64]

Both runs start from the same state and batch (demo_moco:tiny with the queue and
images of tests/test_moco.py; demo:tiny for the GAN) and should differ only by
summation order (one device vs eight partial sums and a psum). Each row is the
largest |1-device - 8-device| of a quantity over its largest magnitude; in float64
the same program must agree to ~1e-14, so a row that does not is a bug (a missing
psum, a per-device group), while a float32 row far above 1e-6 with a float64 row at
1e-14 is reordering amplified by the model. For MoCo the query encoder's forward is
re-run with its intermediates captured on the step's own views and groups, and the
ReLU inputs whose sign differs between the runs are listed (the kinks the backward
pass crosses). float64 runs the same code with jnp.float32 read as float64 (see
`float64`), from the float32 initial state cast up.
"""
import contextlib
import functools
import os
import sys
from unittest import mock

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from configs import demo_moco  # noqa: E402
from nda_jax import images as images_lib  # noqa: E402
from nda_jax import losses  # noqa: E402
from nda_jax import parallel  # noqa: E402
from nda_jax.models import batch_norm  # noqa: E402
from nda_jax.trainers import gan  # noqa: E402
from nda_jax.trainers import method as method_lib  # noqa: E402
from nda_jax.trainers import moco  # noqa: E402

_METHODS = flags.DEFINE_list("methods", ["moco", "gan"], "moco and/or gan.")
_PRECISIONS = flags.DEFINE_list("precisions", ["float32", "float64"], "float32 and/or float64.")
_TOP = flags.DEFINE_integer("top", 8, "Leaves listed per table (worst first).")

B, S, K = 32, 16, 64   # tests/test_moco.py's batch, image size and queue


@contextlib.contextmanager
def float64():
  """The product's float32 as float64: x64 on, `jnp.float32` and config.dtype='float32'
  read as float64 while programs are traced (host arrays are uint8)."""
  with jax.enable_x64(True), mock.patch.object(jnp, "float32", jnp.float64), \
      mock.patch.dict(method_lib.DTYPES, {"float32": jnp.float64}):
    yield


def precision(name):
  return float64() if name == "float64" else contextlib.nullcontext()


def cast(tree, name):
  """A host state in `name` (floating leaves only)."""
  if name != "float64":
    return tree
  def up(x):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
      return x.astype(np.float64)
    return x.astype(np.int64) if x.dtype == np.int32 and not x.ndim else x  # x64's indices
  return jax.tree.map(up, tree)


def rel(a, b) -> float:
  """max |a - b| over max |b| (0 for an all-zero b that a matches)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d, scale = np.abs(a - b).max(initial=0.0), np.abs(b).max(initial=0.0)
  return d / scale if scale else d


def keyed(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------- MoCo
def moco_config():
  c = demo_moco.get_config("tiny")
  c.moco.queue_size = K
  return c


def moco_images():
  return np.random.RandomState(0).randint(0, 256, (B, S, S, 3)).astype(np.uint8)


def moco_run(devices: int, state, images):
  """One step; (state after, metrics, what the step handed the loss, query encoder
  intermediates on the step's query view)."""
  c = moco_config()
  dp = parallel.DataParallel("shard_map", devices)
  method = moco.MoCo(c)
  method.validate(dp.num_devices)
  real_loss, real_norm = losses.moco_infonce, images_lib.normalize_input
  views = []
  gather = lambda x: jax.lax.all_gather(x, parallel.AXIS, tiled=True)

  def normalize_input(config, x):
    views.append(x)
    return real_norm(config, x)

  seen = {}

  def keep(name, x, index):   # each device's shard, exactly (not through the metrics' pmean)
    seen.setdefault(name, {})[int(index)] = np.asarray(x)

  def moco_infonce(q, k, queue, nda_k, **kwargs):
    index = jax.lax.axis_index(parallel.AXIS)
    for n, x in (("q", q), ("k", k), ("nda_k", nda_k), ("key_view", views[0]),
                 ("nda_view", views[1]), ("query_view", views[-1])):
      jax.debug.callback(functools.partial(keep, n), x, index)
    views.clear()
    return real_loss(q, k, queue, nda_k, **kwargs)

  with mock.patch.object(losses, "moco_infonce", moco_infonce), \
      mock.patch.object(images_lib, "normalize_input", normalize_input):
    step = dp.step(method.make_step())
    after, metrics = step(dp.put_state(state), dp.shard_batch({"image": images}))
    metrics = jax.device_get(metrics)
    jax.effects_barrier()
  metrics.update({"spy/" + n: np.concatenate([d[i] for i in sorted(d)]) for n, d in seen.items()})
  after = jax.device_get(dp.get_state(after))

  encoder = moco.build_encoder(c)

  def forward(st, view):   # the step's query forward, intermediates kept
    groups = batch_norm.query_groups(view.shape[0], c.model.bn_group_size, B)
    _, mutated = encoder.apply({"params": st.params, "batch_stats": st.batch_stats},
                               images_lib.normalize_input(c, view), train=True, groups=groups,
                               capture_intermediates=True, mutable=["batch_stats",
                                                                    "intermediates"])
    return jax.tree.map(lambda x: x, mutated["intermediates"])

  inter = jax.device_get(dp.map_over_batch(forward)(dp.put_state(state),
                                                    np.asarray(metrics["spy/query_view"])))
  return after, metrics, keyed(inter)


def relu_inputs(inter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The query encoder's ReLU inputs, from its captured module outputs."""
  out = {}
  def get(path):
    return inter[f"['{path[0]}']" + "".join(f"['{p}']" for p in path[1:]) + "['__call__'][0]"]
  out["bn1"] = get(("backbone", "bn1"))
  blocks = sorted({k.split("']")[1][2:] for k in inter if "['layer" in k})
  previous = np.maximum(out["bn1"], 0)
  for name in blocks:
    out[f"{name}.bn1"] = get(("backbone", name, "bn1"))
    try:
      shortcut = get(("backbone", name, "downsample_bn"))
    except KeyError:
      shortcut = previous
    out[f"{name}.out"] = get(("backbone", name, "bn2")) + shortcut
    previous = get(("backbone", name))
  return out


def moco_tables(prec: str, init) -> dict[str, float]:
  state, images = cast(init, prec), moco_images()
  with precision(prec):
    a1, m1, i1 = moco_run(1, state, images)
    a8, m8, i8 = moco_run(8, state, images)
  dtypes = {str(np.asarray(x).dtype) for x in jax.tree.leaves(a1)
            if np.issubdtype(np.asarray(x).dtype, np.floating)}
  print(f"\n== MoCo, {prec} (state dtypes {sorted(dtypes)}) ==")
  rows = {}
  for n in ("query_view", "key_view", "nda_view", "q", "k", "nda_k"):
    rows[n] = rel(m8["spy/" + n], m1["spy/" + n])
  q1, q8 = (np.asarray(m["spy/q"], np.float64) for m in (m1, m8))
  queue = np.asarray(state.queue, np.float64)
  rows["logits (q.k, q.queue)"] = max(
      rel(np.sum(q8 * m8["spy/k"], -1), np.sum(q1 * m1["spy/k"], -1)), rel(q8 @ queue.T,
                                                                           q1 @ queue.T))
  rows["loss"] = rel(m8["loss"], m1["loss"])
  # BN group statistics: the running averages' change this step (momentum x (batch - old)).
  for part in ("batch_stats", "key_batch_stats"):
    old, n1, n8 = (keyed(getattr(s, part)) for s in (state, a1, a8))
    rows[f"BN group stats ({part})"] = max(rel(n8[k] - old[k], n1[k] - old[k]) for k in old)
  fwd = {k: rel(i8[k], i1[k]) for k in i1}
  rows["query forward, worst module output"] = max(fwd.values())
  for n, v in rows.items():
    print(f"  {n:<40s} {v:9.2e}")

  wd = moco_config().optim.encoder.weight_decay
  p0 = keyed(state.params)
  # After one step SGD's momentum trace is the gradient + wd x params (taken off here).
  g1, g8 = ({k: np.asarray(v, np.float64) - wd * np.asarray(p0[k], np.float64)
             for k, v in ((k.split(".trace", 1)[1], v) for k, v in keyed(s.opt).items()
                          if ".trace" in k)} for s in (a1, a8))
  grads = {k: rel(g8[k], g1[k]) for k in g1}
  worst = sorted(grads, key=grads.get, reverse=True)
  print(f"  gradients: {len(grads)} leaves, median {np.median(list(grads.values())):.2e}, "
        f"worst:")
  for k in worst[:_TOP.value]:
    print(f"    {k:<60s} {grads[k]:9.2e}")
  rows["gradient, worst leaf"] = grads[worst[0]]
  rows["state after the step, worst leaf"] = max(
      rel(v, keyed(a1)[k]) for k, v in keyed(a8).items()
      if np.issubdtype(v.dtype, np.floating))

  r1, r8 = relu_inputs(i1), relu_inputs(i8)
  flips = {k: int(np.sum(np.sign(r1[k]) != np.sign(r8[k]))) for k in r1}
  sizes = {k: r1[k].size for k in r1}
  print(f"  ReLU inputs whose sign differs between 1 and 8 devices "
        f"(of {sum(sizes.values())}): {sum(flips.values())}")
  for k, n in flips.items():
    if n:
      where = np.argwhere(np.sign(r1[k]) != np.sign(r8[k]))
      for idx in where[:4]:
        idx = tuple(idx)
        print(f"    {k:<14s} {str(idx):<18s} 1 dev {r1[k][idx]:+.3e}  8 dev {r8[k][idx]:+.3e}"
              f"  (scale {np.abs(r1[k]).max():.2e})")
  rows["ReLU sign flips"] = sum(flips.values())
  near = sorted(((abs(v[idx]) / np.abs(v).max(), k, idx) for k, v in r1.items()
                 for idx in map(tuple, np.argwhere(np.abs(v) <= np.sort(np.abs(v), None)[2]))))
  print("  ReLU inputs nearest 0 (of scale), 1 dev / 8 dev:")
  for frac, k, idx in near[:_TOP.value]:
    print(f"    {k:<14s} {str(idx):<18s} {frac:.1e}  {r1[k][idx]:+.3e} / {r8[k][idx]:+.3e}")
  return rows


# ---------------------------------------------------------------- GAN
def gan_run(devices: int, state, batch):
  c = demo.get_config("tiny")
  dp = parallel.DataParallel("shard_map", devices)
  method = gan.GAN(c)
  step = dp.step(method.make_step(), batch_axis=1)
  after, metrics = step(dp.put_state(state), dp.shard_batch(batch, batch_axis=1))
  return jax.device_get(dp.get_state(after)), dp.unreplicate_metrics(metrics)


def gan_tables(prec: str, init) -> dict[str, float]:
  c = demo.get_config("tiny")
  rng = np.random.RandomState(0)
  b, nd, s = c.train.batch_size, c.train.num_d_steps, c.data.image_size
  batch = {"image": rng.randint(0, 256, (nd, b, s, s, 3)).astype(np.uint8),
           "label": rng.randint(0, 10, (nd, b)).astype(np.int32)}
  state = cast(init, prec)
  with precision(prec):
    a1, m1 = gan_run(1, state, batch)
    a8, m8 = gan_run(8, state, batch)
  print(f"\n== GAN, {prec} ==")
  k1, k8 = keyed(a1), keyed(a8)
  rows = {"metrics, worst": max(rel(m8[k], m1[k]) for k in m1)}
  groups = {"Adam mu": ".mu", "Adam nu": ".nu"}
  for title, tag in groups.items():
    d = {k: rel(k8[k], k1[k]) for k in k1 if tag in k and k1[k].ndim}
    worst = sorted(d, key=d.get, reverse=True)
    print(f"  {title}: {len(d)} leaves, median {np.median(list(d.values())):.2e}, worst:")
    for k in worst[:_TOP.value]:
        print(f"    {k:<72s} {d[k]:9.2e}")
    bias = [k for k in d if "bias" in k and "g_opt" in k]
    rows[f"{title}, worst leaf"] = d[worst[0]]
    rows[f"{title}, worst leaf except G conv biases"] = max(
        v for k, v in d.items() if k not in bias or "bn" in k.lower())
  rows["parameters, worst |difference| / lr"] = max(
      np.abs(k8[k].astype(np.float64) - k1[k]).max() / c.optim.g.lr for k in k1
      if "params" in k and "_opt" not in k and np.issubdtype(k1[k].dtype, np.floating))
  for n, v in rows.items():
    print(f"  {n:<48s} {v:9.2e}")
  return rows


def main(argv):
  del argv
  assert jax.device_count() == 8, jax.device_count()
  summary = {}
  for name in _METHODS.value:
    if name == "moco":
      init = jax.device_get(moco.MoCo(moco_config()).init_state(jax.random.PRNGKey(0)))
      tables = moco_tables
    else:
      init = jax.device_get(gan.GAN(demo.get_config("tiny")).init_state(jax.random.PRNGKey(0)))
      tables = gan_tables
    for prec in _PRECISIONS.value:
      summary[name, prec] = tables(prec, init)
  print("\n== summary: max |1 dev - 8 dev| / scale ==")
  for (name, prec), rows in summary.items():
    for n, v in rows.items():
      print(f"  {name:<5s} {prec:<8s} {n:<48s} {v:9.2e}")


if __name__ == "__main__":
  app.run(main)
