"""kNN monitor: weighted k-nearest-neighbour top-1 accuracy in a backbone's features.

The monitor of MoCo's CIFAR demo (the weighted kNN of Wu et al. 2018): train
and eval images are embedded with `embed_fn` (pooled backbone features) and
L2-normalised; each eval example takes its k most similar train examples
(cosine similarity s), and each neighbour votes for its class with weight
exp(s / temperature); the class with the largest sum is the prediction.
Needs no training, so it tracks a contrastive run cheaply.

  embed_fn(images uint8 [B, ...]) -> [B, D] features. The evaluator passes this
  process's share of a global batch (B a multiple of the mesh size on one
  process); the result, this batch's features or a global jax.Array of the
  global batch, is all-gathered, and padding rows are dropped.

The feature bank (all train features, float32 [N, D]) sits on one device; eval
examples are classified one batch at a time, so the similarity matrix in memory
is [batch_size, N] (ImageNet: N=1.28M takes 1.3 GB at batch 256; `max_train`
bounds it). `max_train` / `max_eval` > 0 take a seeded random subset of the
split (the images are still read, only the subset is embedded).
"""
from collections.abc import Callable, Iterator
import functools
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from nda_jax.data import pipeline

EmbedFn = Callable[[np.ndarray], jax.Array | np.ndarray]


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def weighted_knn_predict(train_feats: jax.Array, train_labels: jax.Array, query_feats: jax.Array,
                         *, k: int, temperature: float, num_classes: int) -> jax.Array:
  """Class int32 [Q] of each query by a similarity-weighted vote of its k nearest train examples.

  Similarity is the dot product (cosine for L2-normalised features), a neighbour's
  weight exp(sim / temperature); ties between classes go to the lowest class id.
  k larger than the bank raises a ValueError (it is not clipped).

  Args:
    train_feats: [N, D] feature bank.
    train_labels: int [N] its classes in [0, num_classes).
    query_feats: [Q, D].
    k, temperature, num_classes: as above.
  """
  if not 1 <= k <= train_feats.shape[0]:
    raise ValueError(f"k={k} must be in [1, {train_feats.shape[0]}], the size of the feature "
                     f"bank; lower k or embed more train examples")
  if train_labels.shape != train_feats.shape[:1] or query_feats.shape[1:] != train_feats.shape[1:]:
    raise ValueError(f"Shapes do not match: train_feats {train_feats.shape}, train_labels "
                     f"{train_labels.shape}, query_feats {query_feats.shape}")
  sims = jnp.matmul(query_feats.astype(jnp.float32), train_feats.astype(jnp.float32).T,
                    precision=jax.lax.Precision.HIGHEST)
  top_sims, top_index = jax.lax.top_k(sims, k)
  # Relative to each query's best match: the same vote up to a factor, never overflows.
  weights = jnp.exp((top_sims - top_sims[:, :1]) / temperature)
  rows = jnp.arange(query_feats.shape[0])[:, None]
  votes = jnp.zeros((query_feats.shape[0], num_classes), jnp.float32)
  votes = votes.at[rows, train_labels[top_index]].add(weights)
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _subset(n: int, limit: int, seed: int) -> np.ndarray:
  """Bool [n]: all examples (limit 0 or >= n), else a seeded random `limit` of them."""
  if not 0 < limit < n:
    return np.ones(n, bool)
  keep = np.zeros(n, bool)
  keep[np.random.default_rng(seed).permutation(n)[:limit]] = True
  return keep


def _padded(images: np.ndarray, labels: np.ndarray, size: int) -> pipeline.Batch:
  pad = size - len(labels)
  return {"image": np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)]),
          "label": np.concatenate([labels, np.zeros(pad, np.int32)]),
          "mask": np.arange(size) < len(labels)}


def _kept_rows(data: pipeline.EvalData, mine: np.ndarray
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images, labels) of this process's kept examples, batch by batch; stops after the last."""
  remaining = int(mine.sum())
  if not remaining:
    return
  for start, batch in zip(range(0, len(mine), data.batch_size), data):
    rows = np.zeros(data.batch_size, bool)
    segment = mine[start:start + data.batch_size]
    rows[:len(segment)] = segment
    rows &= batch["mask"]
    yield batch["image"][rows], batch["label"][rows]
    remaining -= int(rows.sum())
    if not remaining:
      return


def _select(data: pipeline.EvalData, keep: np.ndarray) -> Iterator[pipeline.Batch]:
  """This process's examples with `keep` True, in padded batches of `data.batch_size`.

  Global example i is read by process i // ceil(N / process_count), as
  make_eval_iterator splits a split. Every process yields the same number of
  batches (padding batches at the end), so the collectives in embed_fn stay matched.
  """
  size = data.batch_size
  per_process = -(-len(keep) // jax.process_count())
  counts = [int(keep[start:start + per_process].sum())
            for start in range(0, per_process * jax.process_count(), per_process)]
  num_batches = max(-(-c // size) for c in counts)
  start = jax.process_index() * per_process
  images, labels = np.zeros((0, *data.element_shape), np.uint8), np.zeros(0, np.int32)
  emitted = 0
  for image, label in _kept_rows(data, keep[start:start + per_process]):
    images, labels = np.concatenate([images, image]), np.concatenate([labels, label])
    while len(labels) >= size:
      yield _padded(images[:size], labels[:size], size)
      images, labels = images[size:], labels[size:]
      emitted += 1
  if len(labels):
    yield _padded(images, labels, size)
    emitted += 1
  for _ in range(emitted, num_batches):
    yield _padded(images[:0], labels[:0], size)


class KnnEvaluator:
  """Weighted kNN top-1 accuracy of `embed_fn`'s features (config: `default_config()`)."""

  requires = ("embed_fn",)

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "type": "knn",
        "every": 0,            # steps between runs; 0: only at the end of training
        "k": 200,
        "temperature": 0.1,
        "train_split": "",     # the feature bank; '': data.train_split
        "eval_split": "",      # the queries; '': data.eval_split
        "max_train": 0,        # 0: the whole split; n: a seeded random n (ImageNet)
        "max_eval": 0,
        "batch_size": 256,     # global; rounded up to a multiple of the mesh size
        "seed": 0,             # of the subsets
    })

  def __init__(self, cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, *,
               workdir: str | None, mesh: jax.sharding.Mesh):
    del workdir  # writes nothing
    if cfg.k < 1 or cfg.temperature <= 0 or cfg.batch_size < 1:
      raise ValueError(f"knn evaluator needs k >= 1, temperature > 0 and batch_size >= 1; got "
                       f"k={cfg.k}, temperature={cfg.temperature}, batch_size={cfg.batch_size}")
    if cfg.max_train < 0 or cfg.max_eval < 0:
      raise ValueError(f"max_train={cfg.max_train} / max_eval={cfg.max_eval}: 0 (all) or more")
    self.cfg = cfg
    self.data_cfg = data_cfg
    self.train_split = cfg.train_split or data_cfg.train_split
    self.eval_split = cfg.eval_split or data_cfg.eval_split
    devices = mesh.devices.size
    self.batch_size = -(-cfg.batch_size // devices) * devices

  def _batches(self, split: str, limit: int, salt: int
               ) -> tuple[pipeline.EvalData, Iterator[pipeline.Batch]]:
    data = pipeline.make_eval_iterator(self.data_cfg, split, self.batch_size)
    return data, _select(data, _subset(data.num_examples, limit, self.cfg.seed + salt))

  @staticmethod
  def _embed(embed_fn: EmbedFn, batch: pipeline.Batch
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2-normalised features, labels and mask of one global batch (padding rows included)."""
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
    features = gather(embed_fn(batch["image"]))   # blocks: CPU collectives must not queue up
    labels, mask = gather(batch["label"]), gather(batch["mask"])
    if features.ndim != 2 or len(features) != len(mask):
      raise ValueError(f"embed_fn returned features of shape {features.shape} for a batch of "
                       f"{len(mask)} examples; expected [{len(mask)}, D]")
    return _l2_normalize(features), labels, mask

  def run(self, embed_fn: EmbedFn) -> Iterator[tuple[str, float]]:
    """Embeds the train split (the bank), classifies the eval split, yields ('knn_top1', acc)."""
    start = time.time()
    cfg = self.cfg
    data, batches = self._batches(self.train_split, cfg.max_train, salt=0)
    bank, bank_labels = [], []
    for batch in batches:
      features, labels, mask = self._embed(embed_fn, batch)
      bank.append(features[mask])
      bank_labels.append(labels[mask])
    bank, bank_labels = jnp.asarray(np.concatenate(bank)), jnp.asarray(np.concatenate(bank_labels))
    correct = total = 0
    _, queries = self._batches(self.eval_split, cfg.max_eval, salt=1)
    for batch in queries:
      features, labels, mask = self._embed(embed_fn, batch)
      predictions = weighted_knn_predict(bank, bank_labels, features, k=cfg.k,
                                         temperature=cfg.temperature,
                                         num_classes=data.num_classes)
      correct += int(np.sum((np.asarray(predictions) == labels) & mask))
      total += int(mask.sum())
    logging.info("knn: %d train features, %d queries, %.1f s", len(bank_labels), total,
                 time.time() - start)
    yield "knn_top1", correct / total
