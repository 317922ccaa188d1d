r"""Reference statistics (mu, sigma) of any data source, as a TTUR-format `.npz`.

FID compares sample statistics with those of real images; this command
computes the latter once, over all devices, e.g. the CIFAR-10 test set with
the FID Inception:

  python -m nda_jax.evaluators.ref_stats --data.name=cifar10 \
      --data.data_dir=/path/cifar-10-batches-py --split=test \
      --inception_weights=pt_inception-2015-12-05-6726825d.pth --out=cifar10_test_stats.npz

or the data of an experiment config (`--config=configs/demo.py --features=digits`).
The file is interchangeable with TTUR / pytorch-fid statistics.
"""
from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from nda_jax.evaluators import features as features_lib
from nda_jax.evaluators import fid
from nda_jax.evaluators import metrics


def data_flag_defaults() -> ml_collections.ConfigDict:
  """Every key `nda_jax.data.sources.make_source` reads, so `--data.<key>=` can set it."""
  c = ml_collections.ConfigDict()
  c.name = ml_collections.FieldReference(None, field_type=str)
  for key in ("data_dir", "label_key", "image_key", "tfds_name", "class_list"):
    c[key] = ml_collections.FieldReference(None, field_type=str)
  for key in ("image_size", "resize_size", "num_classes", "num_frames", "digit_size"):
    c[key] = ml_collections.FieldReference(None, field_type=int)
  c.worker_count = 0
  return c


def compute(data_config: ml_collections.ConfigDict, split: str, network: str,
            weights: ml_collections.ConfigDict, batch_size: int = 100,
            max_count: int | None = None) -> metrics.GaussianStats:
  """Statistics of `network` features over (the first `max_count` images of) a split.

  `weights` holds what the network's builder reads, as in a `sample_quality`
  evaluator's config: `inception_weights` and `resize`, or `digits_classifier`.
  """
  if network not in fid.FEATURE_NETS:
    raise ValueError(f"Unknown feature network {network!r}; valid: {sorted(fid.FEATURE_NETS)}.")
  net = fid.FEATURE_NETS[network](weights)
  extractor = features_lib.FeatureExtractor(net.apply_fn, net.variables, batch_size=batch_size)
  return features_lib.gaussian_stats(fid.data_features(data_config, split, extractor),
                                     net.features_key, max_count)


def main(argv):
  del argv
  f = flags.FLAGS
  data = f.config.data if f.config is not None else f.data
  if not data.get("name"):
    raise app.UsageError("Give --data.name=... (and its keys) or --config=<experiment config>.")
  if not f.out:
    raise app.UsageError("--out is required.")
  data = ml_collections.ConfigDict({k: v for k, v in data.to_dict().items() if v is not None})
  weights = ml_collections.ConfigDict({"inception_weights": f.inception_weights,
                                       "resize": f.resize,
                                       "digits_classifier": f.digits_classifier})
  stats = compute(data, f.split, f.features, weights, f.batch_size, f.num or None)
  metrics.save_stats(f.out, stats.mu, stats.sigma)
  logging.info("Wrote statistics of %d images (%s features) to %s", stats.count, f.features,
               f.out)
  print(f"{stats.count} images -> {f.out}")


if __name__ == "__main__":
  config_flags.DEFINE_config_dict("data", data_flag_defaults(), "Data source (nda_jax.data keys).")
  config_flags.DEFINE_config_file("config", None, "Experiment config; its `data` is used.")
  flags.DEFINE_string("split", "train", "Split of the data source.")
  flags.DEFINE_enum("features", "inception", sorted(fid.FEATURE_NETS), "Feature network.")
  flags.DEFINE_string("inception_weights", None, "pytorch-fid .pth or converted .npz.")
  flags.DEFINE_enum("resize", "legacy_pytorch", ["legacy_pytorch", "clean"],
                    "FID resize mode (the sample_quality evaluator's `resize`).")
  flags.DEFINE_string("digits_classifier", None, "fd_digits classifier cache file.")
  flags.DEFINE_integer("num", 0, "Use only the first N images (0: all).")
  flags.DEFINE_integer("batch_size", 100, "Images per process per batch.")
  flags.DEFINE_string("out", None, "Output .npz (keys mu, sigma).")
  app.run(main)
