"""Sample-quality evaluator: FID / IS / KID (FID Inception) or fd_digits / kid_digits.

A `SampleQualityEvaluator` embeds `num_samples` images drawn from a sampler
callable in the features of one network and reports the requested metrics
of those features. Shape as in big_vision: build with its config, then
`run(sample_fn=...)` yields `(name, value)` pairs.

  sample_fn(rng, n) -> this process's n images, [n, H, W, C], float in [-1, 1]
                       (or uint8). It is called with n = `sample_batch_size`
                       (the last call with the rest), the i-th call with
                       fold_in(rng, i), rng from `seed`. A GAN draws one call
                       as one generator batch, so with batch-statistics BN
                       this is the BN batch (64 in the official protocol).
                       With `truncation` > 0 it is called as
                       sample_fn(rng, n, truncation=t) (a GAN: latents from the
                       normal truncated to [-t, t], BigGAN's truncation trick).

Config (`default_config()`; one network per evaluator: metrics of the
Inception and of the digits classifier go to two `config.evals` entries):
  metrics            keys of METRICS, e.g. ('fid', 'is', 'kid', 'prdc') or ('fd_digits',).
                     'prdc' reports precision, recall, density and coverage
                     ('prdc_digits': precision_digits, ...).
  num_samples        images drawn per evaluation (10000: the paper's FID-10k).
  sample_batch_size  images per sample_fn call (see above).
  batch_size         images per process per feature batch.
  seed               sampling seed (0, as the official sample.py).
  truncation         latent truncation threshold passed to sample_fn (0: none).
  quantize           truncate samples to uint8 levels first (True, as the official
                     pipeline saved uint8 samples before computing FID).
  inception_weights  pytorch-fid's .pth or a converted .npz (fid / is / kid).
  digits_classifier  cache file of the fd_digits classifier (None: ~/.cache).
  ref_stats          TTUR/pytorch-fid .npz for `fid`; when unset, the statistics
                     of the data's `ref_split` are computed once and cached under
                     <workdir>/eval_cache/.
  ref_split          reference split ('': the data's train_split).
  ref_num            use at most this many reference images (0: all).
  resize             how the Inception's input is resized to 299 px, clean-fid's names:
                     'legacy_pytorch' (pytorch-fid's bilinear) or 'clean' (PIL's
                     float bicubic). Neither is the TF graph's resize
                     ('legacy_tensorflow') behind TTUR's and the paper's FIDs.
  is_splits          Inception Score splits.
  kid_subsets, kid_subset_size   KID subsets.
  intra_class        also the intra-class Fréchet distance of each 'fid' / 'fd_digits'
                     metric (StudioGAN's IFID, for conditional models): per class c,
                     samples of class c (sample_fn(rng, n, labels=[c] * n)) against
                     the reference images of class c; yields `intra_<metric>` (the
                     mean over the data's num_classes) and `intra_<metric>/<c>`.
  intra_per_class    samples per class (0: as many as the reference has of the class).
  nearest_k          the k of all four PRDC metrics (5, as StudioGAN passes to
                     `prdc`; the precision/recall paper used 3). PRDC and KID use
                     the same reference features (ref_num, default num_samples).
"""
from collections.abc import Callable, Iterator
import functools
import hashlib
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np

from nda_jax import workdir as workdir_lib
from nda_jax.evaluators import digits_classifier
from nda_jax.evaluators import features as features_lib
from nda_jax.evaluators import metrics
from nda_jax.models import inception
from nda_jax.models import inception_weights

SampleFn = Callable[[jax.Array, int], Any]


class FeatureNet(NamedTuple):
  """A feature network: apply_fn(variables, images [-1, 1]) -> outputs with these keys."""
  apply_fn: Callable[..., Any]
  variables: Any
  features_key: str
  logits_key: str


def _inception_net(cfg: ml_collections.ConfigDict) -> FeatureNet:
  resize = cfg.get("resize", "legacy_pytorch")
  if resize not in inception.RESIZE_MODES:
    raise ValueError(f"resize={resize!r}: valid modes {sorted(inception.RESIZE_MODES)}")
  variables = inception_weights.load(cfg.inception_weights)
  return FeatureNet(inception.InceptionV3FID(resize=resize).apply, variables, "pool",
                    "logits_unbiased")


def _digits_net(cfg: ml_collections.ConfigDict) -> FeatureNet:
  variables = digits_classifier.load_or_train(path=cfg.digits_classifier)
  return FeatureNet(digits_classifier.DigitsCNN().apply, variables, "features", "logits")


# network -> its builder, which reads the network's weights key of the config.
FEATURE_NETS: dict[str, Callable[[ml_collections.ConfigDict], FeatureNet]] = {
    "inception": _inception_net,
    "digits": _digits_net,
}

# metric name -> (feature network, statistic). Statistics: 'fd' Fréchet
# distance, 'is' Inception-Score formula, 'kid' kernel distance.
METRICS: dict[str, tuple[str, str]] = {
    "fid": ("inception", "fd"),
    "is": ("inception", "is"),
    "kid": ("inception", "kid"),
    "fd_digits": ("digits", "fd"),
    "kid_digits": ("digits", "kid"),
    "prdc": ("inception", "prdc"),
    "prdc_digits": ("digits", "prdc"),
}


def network_of(metric_names: tuple[str, ...]) -> str:
  """The one feature network of `metric_names`; ValueError naming the valid choices."""
  unknown = sorted(set(metric_names) - set(METRICS))
  if unknown or not metric_names:
    raise ValueError(f"metrics={tuple(metric_names)!r}: unknown {unknown}; valid choices: "
                     f"{sorted(METRICS)}")
  networks = sorted({METRICS[n][0] for n in metric_names})
  if len(networks) > 1:
    raise ValueError(f"metrics={tuple(metric_names)!r} need the networks {networks}; one "
                     f"sample_quality evaluator embeds with one network: use one "
                     f"config.evals entry per network")
  return networks[0]


def data_features(data_cfg: ml_collections.ConfigDict, split: str,
                  extractor: features_lib.FeatureExtractor) -> Iterator[features_lib.Features]:
  """Features of every image of a data source's split, batch by batch."""
  from nda_jax.data import pipeline  # pylint: disable=g-import-not-at-top  # heavy (grain)
  batches = pipeline.make_eval_iterator(data_cfg, split,
                                        extractor.batch_size * jax.process_count())
  logging.info("embedding %r", batches.source)
  return extractor.iterate(batches)


class _SampleFeatures(NamedTuple):
  """What one pass over the samples keeps: running statistics, and rows for KID / IS."""
  gaussian: metrics.GaussianStats
  features: list[np.ndarray]
  logits: list[np.ndarray]


class SampleQualityEvaluator:
  """Metrics of generated samples in the features of one network."""
  requires = ("sample_fn",)

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    str_or_none = lambda: ml_collections.FieldReference(None, field_type=str)
    return ml_collections.ConfigDict({
        "type": "sample_quality",
        "every": 0,                 # steps between runs; 0: only at the end of training
        "metrics": ("fid",),
        "num_samples": 10000,
        "sample_batch_size": 64,
        "batch_size": 100,
        "seed": 0,
        "truncation": 0.0,
        "quantize": True,
        "inception_weights": str_or_none(),
        "digits_classifier": str_or_none(),
        "ref_stats": str_or_none(),
        "ref_split": "",
        "ref_num": 0,
        "resize": "legacy_pytorch",
        "is_splits": 10,
        "kid_subsets": 100,
        "kid_subset_size": 1000,
        "nearest_k": 5,
        "intra_class": False,
        "intra_per_class": 0,
    })

  def __init__(self, cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, *,
               workdir: str | None = None, mesh: jax.sharding.Mesh | None = None):
    """Args:
      cfg: this evaluator's config (`default_config()` keys).
      data_cfg: the run's data config (the reference images).
      workdir: where reference statistics are cached (None: not cached).
      mesh: the device mesh (default: `parallel.default_mesh()`).
    """
    self.cfg = cfg
    self.data_cfg = data_cfg
    self.metric_names = tuple(cfg.metrics)
    self.network = network_of(self.metric_names)
    for key in ("num_samples", "sample_batch_size", "batch_size", "nearest_k"):
      if cfg[key] < (2 if key == "num_samples" else 1):
        raise ValueError(f"{key}={cfg[key]}: too small")
    if cfg.truncation < 0:
      raise ValueError(f"truncation={cfg.truncation}: use a threshold > 0, or 0 for none")
    if cfg.intra_class:
      if "fd" not in {METRICS[n][1] for n in self.metric_names}:
        raise ValueError(f"intra_class=True needs a Fréchet-distance metric ('fid' or "
                         f"'fd_digits') in metrics={self.metric_names}")
      if data_cfg.get("num_classes", 1) < 2:
        raise ValueError("intra_class=True needs labelled data with num_classes >= 2 (and a "
                         "conditional model)")
    self.workdir = workdir
    self.net = FEATURE_NETS[self.network](cfg)
    self.extractor = features_lib.FeatureExtractor(
        self.net.apply_fn, self.net.variables, batch_size=cfg.batch_size, mesh=mesh,
        quantize=cfg.quantize)
    self._reference: dict[str, Any] = {}

  # --------------------------------------------------------------- references
  @property
  def ref_split(self) -> str:
    return self.cfg.ref_split or self.data_cfg.train_split

  def _reference_batches(self) -> Iterator[features_lib.Features]:
    return data_features(self.data_cfg, self.ref_split, self.extractor)

  def _cache_path(self) -> str | None:
    if not self.workdir:
      return None
    desc = repr(sorted(self.data_cfg.to_dict().items())) + repr(
        (self.ref_split, self.cfg.ref_num, self.network)) + (
            repr(self.cfg.resize) if self.network == "inception" else "")
    digest = hashlib.sha256(desc.encode()).hexdigest()[:12]
    return str(workdir_lib.path(self.workdir) / "eval_cache" /
               f"ref_stats_{self.network}_{digest}.npz")

  def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference: `ref_stats` (inception only), the cache, or computed."""
    if "stats" not in self._reference:
      path = self.cfg.ref_stats if self.network == "inception" else None
      cache = self._cache_path()
      if path:
        self._reference["stats"] = metrics.load_stats(path)
      elif cache and workdir_lib.path(cache).exists():
        self._reference["stats"] = metrics.load_stats(cache)
      else:
        stats = features_lib.gaussian_stats(self._reference_batches(), self.net.features_key,
                                            self.cfg.ref_num or None)
        self._reference["stats"] = (stats.mu, stats.sigma)
        if cache and jax.process_index() == 0:
          metrics.save_stats(cache, *self._reference["stats"])
    return self._reference["stats"]

  def reference_class_stats(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{class: (mu, sigma)} of the reference split's images of each class (kept, not cached)."""
    if "classes" not in self._reference:
      from nda_jax.data import pipeline  # pylint: disable=g-import-not-at-top  # heavy (grain)
      batches = pipeline.make_eval_iterator(self.data_cfg, self.ref_split,
                                            self.extractor.batch_size * jax.process_count())
      stats = {c: metrics.GaussianStats() for c in range(self.data_cfg.num_classes)}
      for feats in self.extractor.iterate(batches, labels=True):
        for c, gaussian in stats.items():
          gaussian.update(feats[self.net.features_key][feats["label"] == c])
      few = {c: g.count for c, g in stats.items() if g.count < 2}
      if few:
        raise ValueError(f"intra_class: the {self.ref_split!r} split has fewer than 2 images "
                         f"of classes {few} (class: count)")
      self._reference["classes"] = {c: (g.mu, g.sigma) for c, g in stats.items()}
      self._reference["class_counts"] = {c: g.count for c, g in stats.items()}
    return self._reference["classes"]

  def reference_features(self) -> np.ndarray:
    """Features of (at most `ref_num`, default `num_samples`) reference images, for KID."""
    if "features" not in self._reference:
      limit = self.cfg.ref_num or self.cfg.num_samples
      chunks, count = [], 0
      for feats in self._reference_batches():
        chunks.append(feats[self.net.features_key][:limit - count])
        count += len(chunks[-1])
        if count >= limit:
          break
      self._reference["features"] = np.concatenate(chunks)
    return self._reference["features"]

  # --------------------------------------------------------------------- run
  def run(self, sample_fn: SampleFn) -> Iterator[tuple[str, float]]:
    """Draws the samples, embeds them batch by batch, yields (metric, value)."""
    cfg = self.cfg
    start = time.time()
    stats = {METRICS[n][1] for n in self.metric_names}
    samples = _SampleFeatures(metrics.GaussianStats(), [], [])
    if cfg.truncation:
      sample_fn = functools.partial(sample_fn, truncation=cfg.truncation)
    batches = features_lib.sample_batches(sample_fn, jax.random.key(cfg.seed), cfg.num_samples,
                                          cfg.sample_batch_size, self.extractor.batch_size)
    for feats in self.extractor.iterate(batches):
      samples.gaussian.update(feats[self.net.features_key])
      if stats & {"kid", "prdc"}:
        samples.features.append(feats[self.net.features_key])
      if "is" in stats:
        samples.logits.append(feats[self.net.logits_key])
    for name in self.metric_names:
      yield from self._statistics[METRICS[name][1]](self, name, samples)
    if cfg.intra_class:
      yield from self._intra_class(sample_fn)
    logging.info("%s metrics of %d samples in %.1f s", self.network, samples.gaussian.count,
                 time.time() - start)

  def _fd(self, name: str, samples: _SampleFeatures) -> Iterator[tuple[str, float]]:
    g = samples.gaussian
    yield name, metrics.frechet_distance(g.mu, g.sigma, *self.reference_stats())

  def _intra_class(self, sample_fn: SampleFn) -> Iterator[tuple[str, float]]:
    """Per class: samples of that class against the reference images of that class."""
    reference = self.reference_class_stats()
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), 1)   # not the main samples' key
    fake = {}
    for c in reference:
      num = self.cfg.intra_per_class or self._reference["class_counts"][c]
      of_class = lambda rng, n, c=c: sample_fn(rng, n, labels=np.full(n, c, np.int32))
      batches = features_lib.sample_batches(of_class, jax.random.fold_in(key, c), num,
                                            self.cfg.sample_batch_size,
                                            self.extractor.batch_size)
      stats = features_lib.gaussian_stats(self.extractor.iterate(batches),
                                          self.net.features_key)
      fake[c] = (stats.mu, stats.sigma)
    mean, per_class = metrics.intra_class_frechet(fake, reference)
    for name in self.metric_names:
      if METRICS[name][1] == "fd":
        yield f"intra_{name}", mean
        for c, value in per_class.items():
          yield f"intra_{name}/{c}", value

  def _is(self, name: str, samples: _SampleFeatures) -> Iterator[tuple[str, float]]:
    mean, std = metrics.inception_score(np.concatenate(samples.logits), self.cfg.is_splits)
    yield name, mean
    yield f"{name}_std", std

  def _kid(self, name: str, samples: _SampleFeatures) -> Iterator[tuple[str, float]]:
    mean, std = metrics.kernel_inception_distance(
        np.concatenate(samples.features), self.reference_features(), self.cfg.kid_subsets,
        self.cfg.kid_subset_size)
    yield name, mean
    yield f"{name}_std", std

  def _prdc(self, name: str, samples: _SampleFeatures) -> Iterator[tuple[str, float]]:
    values = metrics.prdc(self.reference_features(), np.concatenate(samples.features),
                          self.cfg.nearest_k)
    suffix = name[len("prdc"):]             # '' or '_digits'
    for key in metrics.PRDC_KEYS:
      yield key + suffix, values[key]

  _statistics = {"fd": _fd, "is": _is, "kid": _kid, "prdc": _prdc}
