"""Classification accuracy: top-1 / top-5 of a classifier's logits on a held-out split.

The evaluation of main_lincls (its validation loop): every example of the
split (the host's decoded images; `classify_fn` center-crops them as its
model expects), its logits, and whether its label is the argmax (top-1) or
among the 5 largest logits (top-5; reported when the task has >= 5 classes).
Ties between logits go to the lower class index, as `lax.top_k` / argmax.

  classify_fn(images uint8 [B, ...]) -> [B, num_classes] logits. The evaluator
  passes this process's share of a global batch (B a multiple of the mesh size
  on one process); the result is all-gathered and padding rows are dropped.

Metrics are named after the split: '<split>_top1', '<split>_top5'
('val_top1' on ImageNet). `max_examples` > 0 takes a fixed random subset of
the split (seed 0, the same every time), for a cheaper monitor.
"""
from collections.abc import Callable, Iterator
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from nda_jax.data import pipeline
from nda_jax.evaluators import knn

ClassifyFn = Callable[[np.ndarray], jax.Array | np.ndarray]
TOPK = (1, 5)
_SUBSET_SEED = 0


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """Bool [B]: the label is among the k largest logits (ties: lower class index first)."""
  order = np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :k]
  return np.any(order == np.asarray(labels)[:, None], axis=-1)


class ClassificationEvaluator:
  """Top-1 / top-5 accuracy of `classify_fn` on a split (config: `default_config()`)."""

  requires = ("classify_fn",)

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "type": "classification",
        "every": 0,            # steps between runs; 0: only at the end of training
        "split": "",           # '': data.eval_split
        "batch_size": 256,     # global; rounded up to a multiple of the mesh size
        "max_examples": 0,     # 0: the whole split; n: a fixed random n of it
    })

  def __init__(self, cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, *,
               workdir: str | None, mesh: jax.sharding.Mesh):
    del workdir  # writes nothing
    if cfg.batch_size < 1 or cfg.max_examples < 0:
      raise ValueError(f"classification evaluator needs batch_size >= 1 and max_examples >= 0; "
                       f"got batch_size={cfg.batch_size}, max_examples={cfg.max_examples}")
    self.cfg = cfg
    self.data_cfg = data_cfg
    self.split = cfg.split or data_cfg.eval_split
    devices = mesh.devices.size
    self.batch_size = -(-cfg.batch_size // devices) * devices

  def run(self, classify_fn: ClassifyFn) -> Iterator[tuple[str, float]]:
    """Classifies the split; yields ('<split>_top1', acc) and ('<split>_top5', acc)."""
    start = time.time()
    data = pipeline.make_eval_iterator(self.data_cfg, self.split, self.batch_size)
    ks = [k for k in TOPK if k <= data.num_classes]
    # knn's seeded subset and its repacking into batches that hold only kept examples.
    # pylint: disable=protected-access
    keep = knn._subset(data.num_examples, self.cfg.max_examples, _SUBSET_SEED)
    batches = knn._select(data, keep)
    # pylint: enable=protected-access
    correct, total = dict.fromkeys(ks, 0), 0
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
    for batch in batches:
      logits = gather(classify_fn(batch["image"]))   # blocks: CPU collectives must not queue up
      labels, mask = gather(batch["label"]), gather(batch["mask"])
      if logits.shape != (len(mask), data.num_classes):
        raise ValueError(f"classify_fn returned logits of shape {logits.shape} for a batch of "
                         f"{len(mask)} examples of a {data.num_classes}-class split; expected "
                         f"{(len(mask), data.num_classes)}")
      for k in ks:
        correct[k] += int(np.sum(topk_correct(logits, labels, k) & mask))
      total += int(mask.sum())
    logging.info("classification: %d examples of %r, %.1f s", total, self.split,
                 time.time() - start)
    for k in ks:
      yield f"{self.split}_top{k}", correct[k] / total
