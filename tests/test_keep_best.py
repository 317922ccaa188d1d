"""keep_best preserves the best step by a non-monotonic metric; --checkpoint=best finds it."""
import math

import numpy as np

from nda_jax import checkpoint as ckpt_lib

# Non-monotonic metric (min is best); NaN must never be best; the tie at 1.0 goes to the latest.
_METRICS = [5.0, 1.0, 3.0, math.nan, 1.0, 4.0, 2.0, 6.0]


def test_best_survives_keep_n_and_reopen(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1, best_metric="m",
                             best_mode="min", async_save=False)
  for i, m in enumerate(_METRICS, start=1):
    ck.save(i, {"w": np.full(3, i, np.float32)}, metrics={"m": m})
  # Independent reference: the latest step among the minimal finite values.
  finite = [(m, i) for i, m in enumerate(_METRICS, start=1) if math.isfinite(m)]
  best = max(i for m, i in finite if m == min(v for v, _ in finite))
  assert best == 5
  assert ck.best_step() == best
  assert set(ck.all_steps()) == {best, len(_METRICS) - 1, len(_METRICS)}
  ck.close()
  reopened = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1, best_metric="m",
                                   best_mode="min", async_save=False, read_only=True)
  assert reopened.resolve_step("best") == best
  reopened.close()
