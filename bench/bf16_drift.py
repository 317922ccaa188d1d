r"""How far one bf16 step's gradients fall from float32's, batch by batch.

  python bench/bf16_drift.py [--methods=moco,dpc] [--batches=10]

tests/test_bf16_contrastive.py checks one batch; its worst weight tensor moves a
lot between batches (bf16 rounding of activations adds up along the backward
pass, and BN over 8-example groups amplifies it), so its bounds come from this
table: per batch, the worst tensor's |norm ratio - 1| and cosine, and the cosine
of all weight tensors together, then mean, sd, min and max over the batches.
"""
import os
import sys

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import test_bf16_contrastive as cases  # noqa: E402
from nda_jax import parallel  # noqa: E402
from nda_jax import trainers  # noqa: E402
from test_bf16 import _gradients  # noqa: E402

_METHODS = flags.DEFINE_list("methods", ["moco", "dpc"], "moco, dpc")
_BATCHES = flags.DEFINE_integer("batches", 10, "consecutive training batches, from the first")


def _weight_gradients(name, dtype, batches):
  module, make_batch = cases.CASES[name]
  c = cases._config(module, dtype)   # pylint: disable=protected-access
  method = trainers.get_method(c, 1000)
  method.validate(1)
  dp = parallel.DataParallel("shard_map", 1)
  step = dp.step(method.make_step())
  before = jax.device_get(method.init_state(jax.random.PRNGKey(0)))
  images = make_batch(c, batches * c.train.batch_size)["image"]
  out = []
  for chunk in np.split(images, batches):
    after, _ = step(dp.put_state(before), dp.shard_batch({"image": chunk}))
    grads = _gradients(before, jax.device_get(dp.get_state(after)), "params")
    out.append([g for _, g in grads if g.ndim >= 2])
  return out


def main(argv):
  del argv
  for name in _METHODS.value:
    f32, bf16 = (_weight_gradients(name, d, _BATCHES.value) for d in ("float32", "bfloat16"))
    rows = []
    for a_s, b_s in zip(f32, bf16):
      pairs = [(a, b) for a, b in zip(a_s, b_s) if np.any(a)]
      norm = max(abs(np.linalg.norm(b) / np.linalg.norm(a) - 1) for a, b in pairs)
      cosine = min(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in pairs)
      a, b = (np.concatenate([x.ravel() for x in xs]) for xs in zip(*pairs))
      rows.append((norm, cosine, a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    for i, row in enumerate(rows):
      print(f"{name} batch {i}: worst norm error {row[0]:.3f}  worst cosine {row[1]:.3f}  "
            f"all-weights cosine {row[2]:.3f}")
    for label, values in zip(("worst norm error", "worst cosine", "all-weights cosine"),
                             np.array(rows).T):
      print(f"{name} {label}: mean {values.mean():.3f} sd {values.std(ddof=1):.3f} "
            f"min {values.min():.3f} max {values.max():.3f} (n={len(values)})")


if __name__ == "__main__":
  app.run(main)
