"""Sample-quality evaluators: FID / IS / KID (FID Inception) and fd_digits.

One `SampleQualityEvaluator` per feature network embeds `num_samples` images
drawn from a sampler callable and reports the requested metrics of those
features. Shape as in big_vision: build with the config, then
`run(sample_fn=...)` yields `(name, value)` pairs.

  sample_fn(rng, n) -> this process's n images, [n, H, W, C], float in [-1, 1]
                       (or uint8); drawn in chunks of `eval.sample_chunk`, the
                       i-th chunk from `fold_in(rng, i)` with rng from `eval.seed`.

Config keys read (config.eval unless noted):
  num_samples        images drawn per evaluation (10000: the paper's FID-10k).
  sample_chunk       images per sample_fn call; 0 (default) = all at once.
  batch_size         images per process per feature batch (default 100).
  seed               sampling seed (default 0, as the official sample.py).
  quantize           truncate samples to uint8 levels first (default True, as the
                     official pipeline saved uint8 samples before computing FID).
  inception_weights  pytorch-fid's .pth or a converted .npz (fid / is / kid).
  ref_stats          TTUR/pytorch-fid .npz for `fid`; when unset, the statistics
                     of config.data's `ref_split` (default: its train split) are
                     computed once and cached under <workdir>/eval_cache/.
  ref_split, ref_num reference split and at most this many of its images.
  is_splits          Inception Score splits (10).
  kid_subsets, kid_subset_size   KID subsets (100 of 1000).
  digits_classifier  cache path of the fd_digits classifier (default: ~/.cache).
"""
from collections.abc import Callable, Iterator, Sequence
import hashlib
import os
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np

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


def _inception_net(eval_config: ml_collections.ConfigDict) -> FeatureNet:
  variables = inception_weights.load(eval_config.get("inception_weights"))
  return FeatureNet(inception.InceptionV3FID().apply, variables, "pool", "logits_unbiased")


def _digits_net(eval_config: ml_collections.ConfigDict) -> FeatureNet:
  variables = digits_classifier.load_or_train(path=eval_config.get("digits_classifier"))
  return FeatureNet(digits_classifier.DigitsCNN().apply, variables, "features", "logits")


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
}


def data_features(data_config: ml_collections.ConfigDict, split: str,
                  extractor: features_lib.FeatureExtractor) -> Iterator[features_lib.Features]:
  """Features of every image of a data source's split, batch by batch."""
  from nda_jax.data import pipeline  # pylint: disable=g-import-not-at-top  # heavy (grain)
  batches = pipeline.make_eval_iterator(data_config, split,
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

  def __init__(self, config: ml_collections.ConfigDict, network: str,
               metric_names: Sequence[str], *, workdir: str | None = None,
               mesh: jax.sharding.Mesh | None = None, net: FeatureNet | None = None):
    """Args:
      config: the experiment config (reads `eval` and, for references, `data`).
      network: a key of FEATURE_NETS.
      metric_names: metrics of that network (keys of METRICS).
      workdir: where reference statistics are cached (None: not cached).
      mesh: the device mesh (default: all devices along 'data').
      net: use this network instead of building FEATURE_NETS[network] (tests).
    """
    if network not in FEATURE_NETS:
      raise ValueError(f"Unknown feature network {network!r}; valid: {sorted(FEATURE_NETS)}.")
    for name in metric_names:
      if METRICS.get(name, (None,))[0] != network:
        raise ValueError(f"Metric {name!r} is not one of the {network!r} metrics "
                         f"{sorted(k for k, v in METRICS.items() if v[0] == network)}.")
    self.config = config
    self.eval_config = config.eval
    self.network = network
    self.metric_names = tuple(metric_names)
    self.workdir = workdir
    self.net = net or FEATURE_NETS[network](self.eval_config)
    self.extractor = features_lib.FeatureExtractor(
        self.net.apply_fn, self.net.variables, batch_size=self.eval_config.get("batch_size", 100),
        mesh=mesh, quantize=self.eval_config.get("quantize", True))
    self._reference: dict[str, Any] = {}

  # --------------------------------------------------------------- references
  def _reference_batches(self) -> Iterator[features_lib.Features]:
    data = self.config.data
    split = self.eval_config.get("ref_split") or data.get("train_split", "train")
    return data_features(data, split, self.extractor)

  def _cache_path(self) -> str | None:
    if not self.workdir:
      return None
    desc = repr(sorted(self.config.data.to_dict().items())) + repr(
        (self.eval_config.get("ref_split"), self.eval_config.get("ref_num"), self.network))
    digest = hashlib.sha256(desc.encode()).hexdigest()[:12]
    return os.path.join(self.workdir, "eval_cache", f"ref_stats_{self.network}_{digest}.npz")

  def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference: `eval.ref_stats` (fid only), the cache, or computed."""
    if "stats" not in self._reference:
      path = self.eval_config.get("ref_stats") if self.network == "inception" else None
      cache = self._cache_path()
      if path:
        self._reference["stats"] = metrics.load_stats(path)
      elif cache and os.path.exists(cache):
        self._reference["stats"] = metrics.load_stats(cache)
      else:
        stats = features_lib.gaussian_stats(self._reference_batches(), self.net.features_key,
                                            self.eval_config.get("ref_num"))
        self._reference["stats"] = (stats.mu, stats.sigma)
        if cache and jax.process_index() == 0:
          metrics.save_stats(cache, *self._reference["stats"])
    return self._reference["stats"]

  def reference_features(self) -> np.ndarray:
    """Features of (at most num_samples) reference images, for KID."""
    if "features" not in self._reference:
      limit = self.eval_config.get("ref_num") or self.eval_config.num_samples
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
    cfg = self.eval_config
    start = time.time()
    num = cfg.num_samples
    stats = {METRICS[n][1] for n in self.metric_names}
    samples = _SampleFeatures(metrics.GaussianStats(), [], [])
    batches = features_lib.sample_batches(sample_fn, jax.random.key(cfg.get("seed", 0)), num,
                                          cfg.get("sample_chunk", 0) or num)
    for feats in self.extractor.iterate(batches):
      samples.gaussian.update(feats[self.net.features_key])
      if "kid" in stats:
        samples.features.append(feats[self.net.features_key])
      if "is" in stats:
        samples.logits.append(feats[self.net.logits_key])
    for name in self.metric_names:
      yield from self._statistics[METRICS[name][1]](self, name, samples)
    logging.info("%s metrics of %d samples in %.1f s", self.network, num, time.time() - start)

  def _fd(self, name: str, samples: _SampleFeatures) -> Iterator[tuple[str, float]]:
    g = samples.gaussian
    yield name, metrics.frechet_distance(g.mu, g.sigma, *self.reference_stats())

  def _is(self, name: str, samples: _SampleFeatures) -> Iterator[tuple[str, float]]:
    mean, std = metrics.inception_score(np.concatenate(samples.logits),
                                        self.eval_config.get("is_splits", 10))
    yield name, mean
    yield f"{name}_std", std

  def _kid(self, name: str, samples: _SampleFeatures) -> Iterator[tuple[str, float]]:
    mean, std = metrics.kernel_inception_distance(
        np.concatenate(samples.features), self.reference_features(),
        self.eval_config.get("kid_subsets", 100), self.eval_config.get("kid_subset_size", 1000))
    yield name, mean
    yield f"{name}_std", std

  _statistics = {"fd": _fd, "is": _is, "kid": _kid}

