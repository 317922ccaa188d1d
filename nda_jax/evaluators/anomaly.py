"""Anomaly detection with a GAN discriminator: score = D(x), AUROC in-dist vs OOD.

The paper (§4.4) scores images with the raw output of the NDA-trained
discriminator (higher = more in-distribution) and reports the AUROC between
the in-distribution test set (the positives) and each out-of-distribution set:
  * CIFAR-10-C: `<dir>/<corruption>.npy` (uint8 [50000, 32, 32, 3] = 5
    severities x the 10k test images, severity 1 first) and `labels.npy`;
    the AUROC over all 50k (as the official leftover code) and per severity;
  * other data sources (SVHN, CIFAR-100, ... through `nda_jax.data`);
  * NDA-transformed in-distribution test images (jigsaw, stitch, ...);
  * image sets that need no download (`SYNTHETIC`: patches of the photos that
    ship with scikit-learn, uniform noise), for the demo.
Images are fed in the training normalisation, [-1, 1]. The official leftover
code (train_fns_aug.py:GAN_log_function) fed x / 255 in [0, 1] instead, which
is not what D was trained on; we do not reproduce that.

  score_fn(images, labels) -> [B] scores, images a float32 [-1, 1] global
  jax.Array [B, H, W, C] split over the mesh axis `parallel.AXIS`, labels
  int32 [B]. Labels are zeros (as the official code, which ran D with y = 0)
  unless `labels='given'`, which passes each set's own labels (a conditional D).

Config (`default_config()`; the in-distribution data is the run's data config):
  split        in-distribution split ('': the data's eval_split).
  batch_size   global batch size of score_fn calls.
  max_examples at most this many images per set (per severity for CIFAR-10-C;
               0: all).
  labels       'zeros' or 'given'.
  cifar10c_dir directory of the CIFAR-10-C .npy files (None: no CIFAR-10-C).
  corruptions  CIFAR-10-C corruptions (default: the official 19).
  ood_data     data configs (`nda_jax.data` keys, plus `split`, default
               'test', and `label`, the table name, default its `name`).
  ndas         NDA configs (a name, or {'name', 'params', 'probs'}).
  synthetic    names from SYNTHETIC.
  seed         NDA and synthetic-set seed.
  out_dir      where anomaly.json / anomaly.md go (None: <workdir>/anomaly).
The set lists are empty by default; `with_default_sets` fills in the run's
own NDA and the synthetic sets (what `nda_jax.eval` does when none is set).
"""
from collections.abc import Callable, Iterable, Iterator, Mapping
import itertools
import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
from sklearn import metrics as sk_metrics

from nda_jax import parallel
from nda_jax import workdir as workdir_lib
from nda_jax.evaluators import features as features_lib

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

# The 19 corruptions the official code loads (train_fns_aug.py), file stems.
CIFAR10C_CORRUPTIONS = (
    "elastic_transform", "jpeg_compression", "speckle_noise", "gaussian_noise",
    "gaussian_blur", "zoom_blur", "brightness", "contrast", "defocus_blur", "fog",
    "frost", "glass_blur", "impulse_noise", "motion_blur", "pixelate", "saturate",
    "shot_noise", "snow", "spatter")
CIFAR10C_SEVERITIES = 5
CIFAR10C_URL = "https://zenodo.org/record/2535967"
LABEL_MODES = ("zeros", "given")


def auroc(in_scores: np.ndarray, ood_scores: np.ndarray) -> float:
  """Area under the ROC curve; in-distribution is the positive class (higher score)."""
  y = np.concatenate([np.ones(len(in_scores)), np.zeros(len(ood_scores))])
  return float(sk_metrics.roc_auc_score(y, np.concatenate([in_scores, ood_scores])))


# --------------------------------------------------------------------- synthetic OOD sets
def photo_patches(num: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
  """Random square crops of scikit-learn's sample photos, resized to `shape` (uint8)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  photos = datasets.load_sample_images().images
  rng = np.random.RandomState(seed)
  h, w, c = shape
  out = np.empty((num, h, w, c), np.uint8)
  for i in range(num):
    photo = photos[rng.randint(len(photos))]
    side = rng.randint(min(photo.shape[:2]) // 8, min(photo.shape[:2]) // 2)
    y, x = rng.randint(photo.shape[0] - side), rng.randint(photo.shape[1] - side)
    patch = Image.fromarray(photo[y:y + side, x:x + side]).resize((w, h), Image.Resampling.BILINEAR)
    patch = np.asarray(patch)
    out[i] = patch.mean(axis=-1, keepdims=True).astype(np.uint8) if c == 1 else patch[..., :c]
  return out


def uniform_noise(num: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (num, *shape)).astype(np.uint8)


SYNTHETIC: dict[str, Callable[[int, tuple[int, ...], int], np.ndarray]] = {
    "photo_patches": photo_patches,
    "uniform_noise": uniform_noise,
}


# --------------------------------------------------------------------------- scoring
def round_batch(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """`batch_size` rounded up to a multiple of the device count."""
  n = mesh.devices.size
  return -(-batch_size // n) * n


class Scorer:
  """Runs score_fn over host image sets in fixed-size global batches."""

  def __init__(self, score_fn: ScoreFn, batch_size: int, mesh: jax.sharding.Mesh | None = None,
               labels: str = "zeros", channels: int = 3):
    if labels not in LABEL_MODES:
      raise ValueError(f"labels={labels!r}; valid choices: {LABEL_MODES}")
    self.mesh = mesh or parallel.default_mesh()
    self.batch_size = round_batch(batch_size, self.mesh)
    self.local_batch = self.batch_size // jax.process_count()
    self._score_fn = score_fn
    self._sharding = NamedSharding(self.mesh, P(parallel.AXIS))
    self._zero_labels = labels == "zeros"
    self.channels = channels

  def _score_batch(self, images: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """This process's padded local batch -> scores of the valid rows of the global batch."""
    x = features_lib.to_unit_range(np.asarray(images))
    if x.shape[-1] != self.channels:
      if x.shape[-1] != 1:
        raise ValueError(f"Images with {x.shape[-1]} channels, score_fn takes {self.channels}.")
      x = np.repeat(x, self.channels, axis=-1)
    y = np.zeros_like(labels, np.int32) if self._zero_labels else labels.astype(np.int32)
    put = lambda a: jax.make_array_from_process_local_data(self._sharding, np.asarray(a))
    scores = self._score_fn(put(x), put(y))
    scores = np.asarray(multihost_utils.process_allgather(scores, tiled=True), np.float64)
    mask = np.asarray(multihost_utils.process_allgather(mask, tiled=True), bool)
    if scores.shape != mask.shape:
      raise ValueError(f"score_fn returned shape {scores.shape}, expected {mask.shape}.")
    return scores[mask]

  def _pad(self, images, labels, mask):
    pad = self.local_batch - len(images)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    return images, labels, mask

  def score_batches(self, batches: Iterable[Mapping[str, np.ndarray]],
                    transform: Callable[[int, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Scores of {'image', 'label', 'mask'} local batches of `local_batch` (an EvalData pass).

    `transform(i, float_images)` (e.g. an NDA) is applied to batch i in [-1, 1].
    """
    out = []
    for i, batch in enumerate(batches):
      images, labels, mask = self._pad(batch["image"], batch["label"],
                                       np.asarray(batch.get("mask", np.ones(len(batch["image"]))),
                                                  bool))
      if transform is not None:
        images = transform(i, _fill_padding(np.asarray(features_lib.to_unit_range(images)), mask))
      out.append(self._score_batch(images, labels, mask))
    return np.concatenate(out)

  def score_array(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Scores of a whole host array set (each process reads its contiguous block)."""
    n, count, index = len(images), jax.process_count(), jax.process_index()
    per_process = -(-n // count)
    start, stop = index * per_process, min((index + 1) * per_process, n)
    num_batches = max(1, -(-per_process // self.local_batch))

    def batches():
      for b in range(num_batches):
        lo, hi = start + b * self.local_batch, min(start + (b + 1) * self.local_batch, stop)
        lo = min(lo, hi)
        yield {"image": np.asarray(images[lo:hi]), "label": np.asarray(labels[lo:hi]),
               "mask": np.ones(hi - lo, bool)}
    return self.score_batches(batches())


def _fill_padding(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Padding rows become copies of valid rows, so batch-mixing NDAs see real partners."""
  valid = np.flatnonzero(mask)
  if len(valid) in (0, len(mask)):
    return images
  out = images.copy()
  pads = np.flatnonzero(~mask)
  out[pads] = images[valid[np.arange(len(pads)) % len(valid)]]
  return out


# ------------------------------------------------------------------------- evaluator
SET_KEYS = ("ndas", "ood_data", "synthetic", "cifar10c_dir")


def _nda_config(spec: Any) -> dict[str, Any]:
  if isinstance(spec, str):
    return {"name": spec}
  return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def _ood_source(spec: Any) -> tuple[str, str, ml_collections.ConfigDict]:
  """An `ood_data` entry -> (table label, split, its data config)."""
  data = ml_collections.ConfigDict(_nda_config(spec))
  split = data.get("split", "test")
  label = data.get("label", data.name)
  for key in ("split", "label"):
    if key in data:
      del data[key]
  return label, split, data


def with_default_sets(cfg: ml_collections.ConfigDict,
                      nda_cfg: ml_collections.ConfigDict | None) -> bool:
  """Without any configured OOD set: the run's NDA (if any) and every synthetic set.

  An NDA-GAN's D was trained to reject exactly its NDA, so NDA(test) is the
  natural first out-of-distribution set; the synthetic ones show how D ranks
  images unlike anything it saw. Returns whether `cfg` was changed.
  """
  if any(cfg[k] for k in SET_KEYS):
    return False
  if nda_cfg is not None:
    cfg.ndas = (nda_cfg.to_dict(),)
  cfg.synthetic = tuple(sorted(SYNTHETIC))
  return True


class AnomalyEvaluator:
  """AUROC of score_fn between the in-distribution test split and every OOD set."""
  requires = ("score_fn",)

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    str_or_none = lambda: ml_collections.FieldReference(None, field_type=str)
    return ml_collections.ConfigDict({
        "type": "anomaly",
        "every": 0,                 # steps between runs; 0: only at the end of training
        "split": "",
        "batch_size": 500,
        "max_examples": 0,
        "labels": "zeros",
        "cifar10c_dir": str_or_none(),
        "corruptions": CIFAR10C_CORRUPTIONS,
        "ood_data": (),
        "ndas": (),
        "synthetic": (),
        "seed": 0,
        "out_dir": str_or_none(),
    })

  def __init__(self, cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, *,
               workdir: str | None = None, mesh: jax.sharding.Mesh | None = None):
    from nda_jax.augment import negative  # pylint: disable=g-import-not-at-top
    self.cfg = cfg
    self.data_cfg = data_cfg
    self.mesh = mesh or parallel.default_mesh()
    self.out_dir = cfg.out_dir or (str(workdir_lib.path(workdir) / "anomaly") if workdir
                                   else None)
    if cfg.labels not in LABEL_MODES:
      raise ValueError(f"labels={cfg.labels!r}; valid choices: {LABEL_MODES}")
    unknown = sorted(set(cfg.synthetic) - set(SYNTHETIC))
    if unknown:
      raise ValueError(f"Unknown synthetic OOD set(s) {unknown}; valid: {sorted(SYNTHETIC)}.")
    # Built here: a bad NDA config fails before any work.
    self._ndas = [(spec["name"], negative.build_nda(spec)) for spec in map(_nda_config, cfg.ndas)]
    self._ood = [_ood_source(spec) for spec in cfg.ood_data]
    if cfg.cifar10c_dir:
      missing = [c for c in (*cfg.corruptions, "labels")
                 if not os.path.exists(os.path.join(cfg.cifar10c_dir, f"{c}.npy"))]
      if missing:
        raise FileNotFoundError(f"CIFAR-10-C files {missing} not found in "
                                f"{cfg.cifar10c_dir!r}; get CIFAR-10-C.tar from "
                                f"{CIFAR10C_URL} and unpack it there.")

  def _eval_data(self, data_cfg: ml_collections.ConfigDict, split: str, batch_size: int):
    from nda_jax.data import pipeline  # pylint: disable=g-import-not-at-top  # heavy (grain)
    return pipeline.make_eval_iterator(data_cfg, split, batch_size)

  def _limited(self, batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[dict]:
    """The first `max_examples` of a pass (split evenly over processes).

    Every process stops after the same number of batches, so the collectives
    inside score_fn stay matched.
    """
    limit = self.cfg.max_examples
    per_process = -(-limit // jax.process_count()) if limit else None
    position = 0
    for batch in batches:
      if per_process is not None and position >= per_process:
        return
      mask = np.asarray(batch["mask"], bool)
      if per_process is not None:
        mask = mask & (position + np.arange(len(mask)) < per_process)
      position += len(mask)
      yield {**batch, "mask": mask}

  def run(self, score_fn: ScoreFn) -> Iterator[tuple[str, float]]:
    """Scores every set, writes the table, yields ('anomaly/<set>[/s<k>]', AUROC)."""
    start = time.time()
    cfg = self.cfg
    split = cfg.split or self.data_cfg.eval_split
    in_data = self._eval_data(self.data_cfg, split, round_batch(cfg.batch_size, self.mesh))
    shape = tuple(in_data.element_shape)
    scorer = Scorer(score_fn, in_data.batch_size * jax.process_count(), self.mesh, cfg.labels,
                    channels=shape[-1])
    in_scores = scorer.score_batches(self._limited(in_data))
    ood_sets = itertools.chain(self._nda_sets(scorer, in_data), self._ood_sets(scorer, shape),
                               self._synthetic_sets(scorer, shape, len(in_scores)),
                               self._cifar10c_sets(scorer, shape))
    rows = [{"set": name, "severity": severity, "n_ood": int(len(scores)),
             "auroc": auroc(in_scores, scores), "mean_score": float(np.mean(scores))}
            for name, scores, severity in ood_sets]
    result = {"in_distribution": {"split": split, "n": int(len(in_scores)),
                                  "mean_score": float(np.mean(in_scores))},
              "normalisation": "[-1, 1] (the official leftover code used [0, 1])",
              "rows": rows}
    if self.out_dir and jax.process_index() == 0:
      write_tables(result, self.out_dir)
    logging.info("anomaly AUROC of %d sets in %.1f s", len(rows), time.time() - start)
    yield from auroc_metrics(rows)

  # Each `_*_sets` yields (set name, scores, severity) of its OOD sets, one at a time.
  def _nda_sets(self, scorer: Scorer, in_data) -> Iterator[tuple[str, np.ndarray, str]]:
    """NDA(in-distribution test images), one set per configured NDA."""
    for index, (name, nda_fn) in enumerate(self._ndas):
      nda = jax.jit(nda_fn)
      key = jax.random.fold_in(jax.random.key(self.cfg.seed), index)
      transform = lambda i, x, nda=nda, key=key: np.asarray(nda(jax.random.fold_in(key, i), x))
      yield f"nda/{name}", scorer.score_batches(self._limited(in_data), transform), "all"

  def _ood_sets(self, scorer: Scorer, shape: tuple[int, ...]
                ) -> Iterator[tuple[str, np.ndarray, str]]:
    """The configured `ood_data` datasets (images of the in-distribution size)."""
    for label, ood_split, ood in self._ood:
      data = self._eval_data(ood, ood_split, scorer.batch_size)
      if tuple(data.element_shape)[:2] != shape[:2]:
        raise ValueError(f"OOD set {label!r} has images {data.element_shape}, the "
                         f"in-distribution ones {shape}; set its image_size.")
      yield label, scorer.score_batches(self._limited(data)), "all"

  def _synthetic_sets(self, scorer: Scorer, shape: tuple[int, ...], num_in: int
                      ) -> Iterator[tuple[str, np.ndarray, str]]:
    """Synthetic images (SYNTHETIC), as many as the in-distribution set (or max_examples)."""
    for name in self.cfg.synthetic:
      num = self.cfg.max_examples or num_in
      images = SYNTHETIC[name](num, shape, self.cfg.seed)
      yield f"synthetic/{name}", scorer.score_array(images, np.zeros(num, np.int32)), "all"

  def _cifar10c_sets(self, scorer: Scorer, shape: tuple[int, ...]
                     ) -> Iterator[tuple[str, np.ndarray, str]]:
    """Each CIFAR-10-C corruption: all severities together, then each severity."""
    cfg = self.cfg
    if not cfg.cifar10c_dir:
      return
    labels = np.load(os.path.join(cfg.cifar10c_dir, "labels.npy"))
    for corruption in cfg.corruptions:
      images = np.load(os.path.join(cfg.cifar10c_dir, f"{corruption}.npy"), mmap_mode="r")
      if images.shape[1:] != shape:
        raise ValueError(f"{corruption}.npy holds {images.shape[1:]} images, the in-"
                         f"distribution data {shape}.")
      per = len(images) // CIFAR10C_SEVERITIES
      take = min(per, cfg.max_examples or per)
      by_severity = [scorer.score_array(images[s * per:s * per + take],
                                        labels[s * per:s * per + take])
                     for s in range(CIFAR10C_SEVERITIES)]
      yield f"cifar10c/{corruption}", np.concatenate(by_severity), "all"
      for s, scores in enumerate(by_severity, 1):
        yield f"cifar10c/{corruption}", scores, str(s)


def auroc_metrics(rows: list[dict[str, Any]]) -> Iterator[tuple[str, float]]:
  """('anomaly/<set>[/s<k>]', AUROC) of each row, then the mean over CIFAR-10-C corruptions."""
  for row in rows:
    suffix = "" if row["severity"] == "all" else f"/s{row['severity']}"
    yield f"anomaly/{row['set']}{suffix}", row["auroc"]
  c10c = [r["auroc"] for r in rows if r["set"].startswith("cifar10c/") and r["severity"] == "all"]
  if c10c:
    yield "anomaly/cifar10c_mean", float(np.mean(c10c))


def markdown_table(result: Mapping[str, Any]) -> str:
  """CIFAR-10-C: one row per corruption (all, severities 1-5); other sets: one row each."""
  rows = result["rows"]
  lines = [f"In-distribution: {result['in_distribution']['split']} split, "
           f"n={result['in_distribution']['n']}; inputs in {result['normalisation']}.", ""]
  other = [r for r in rows if not r["set"].startswith("cifar10c/")]
  if other:
    lines += ["| OOD set | n | AUROC |", "|---|---|---|"]
    lines += [f"| {r['set']} | {r['n_ood']} | {r['auroc']:.4f} |" for r in other]
    lines.append("")
  c10c = [r for r in rows if r["set"].startswith("cifar10c/")]
  if c10c:
    table: dict[str, dict[str, float]] = {}
    for r in c10c:
      table.setdefault(r["set"].split("/", 1)[1], {})[r["severity"]] = r["auroc"]
    severities = ["all"] + [str(s) for s in range(1, CIFAR10C_SEVERITIES + 1)]
    lines += ["| CIFAR-10-C corruption | all | " + " | ".join(f"s{s}" for s in severities[1:])
              + " |", "|---" * len(severities) + "|---|"]
    for name, by in table.items():
      lines.append(f"| {name} | " + " | ".join(f"{by[s]:.4f}" for s in severities) + " |")
    mean = {s: np.mean([by[s] for by in table.values()]) for s in severities}
    lines.append("| **mean** | " + " | ".join(f"{mean[s]:.4f}" for s in severities) + " |")
  return "\n".join(lines) + "\n"


def write_tables(result: Mapping[str, Any], out_dir: str) -> None:
  out = workdir_lib.path(out_dir)   # Local or a bucket.
  out.mkdir(parents=True, exist_ok=True)
  (out / "anomaly.json").write_text(json.dumps(result, indent=1))
  (out / "anomaly.md").write_text(markdown_table(result))
