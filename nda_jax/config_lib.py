"""Building blocks of the configs in `configs/` (big_vision's `configs.common` role)."""
import json
import os

import ml_collections


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The resolved config, beside the run's checkpoints."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to its workdir (for eval, sampling, importers)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not the workdir of a run")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def parse_variants(arg: str | None, valid: tuple[str, ...]) -> set[str]:
  """'cond,baseline' -> {'cond', 'baseline'}, rejecting unknown variants by name."""
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = variants - set(valid)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; valid choices: {sorted(valid)}")
  return variants


def gan_config() -> ml_collections.ConfigDict:
  """The official NDA-GAN recipe (train_C10.sh): BigGAN_new, hinge, jigsaw k=2, 0.25/0.75."""
  c = ml_collections.ConfigDict()
  c.trainer = "gan"
  c.seed = 2
  c.parallel = "shard_map"              # or "pmap": same numbers
  c.max_devices = 0                     # 0: every device; n: the first n (one process)

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.channels = 3
  c.data.num_classes = 10
  c.data.read_threads = 1                # batches prepared ahead in threads
  c.data.worker_count = 0               # > 0: in grain worker processes instead

  c.model = ml_collections.ConfigDict()
  c.model.name = "biggan"
  c.model.ch = 64                       # G_ch = D_ch = 64 -> 256-channel blocks
  c.model.dim_z = 128
  c.model.conditional = False           # C10U: labels forced to 0, one class
  c.model.conv_impl = "auto"            # 'auto' | 'xla' | 'matmul' (fast CPU weight gradients)
  c.model.sample_bn = "batch"           # official sampling: G_ema with batch-statistics BN

  c.nda = ml_collections.ConfigDict()
  c.nda.name = "jigsaw"                 # any of negative.NDAS, or 'a+b' with c.nda.probs
  c.nda.probs = ml_collections.FieldReference(None, field_type=list)
  c.nda.params = ml_collections.ConfigDict({"jigsaw": {"k": 2, "layout": "official"}})

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "hinge"
  c.loss.alpha = 0.25                   # weight of G(z) among the fakes (paper's lambda)
  c.loss.beta = 0.75                    # weight of NDA(real) (1 - lambda)

  c.optim = ml_collections.ConfigDict()
  c.optim.g_lr = 2e-4
  c.optim.d_lr = 2e-4
  c.optim.b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.num_d_steps = 4
  # The D steps as straight-line code ("unroll") or as a lax.scan ("loop");
  # "auto": unrolled on CPU, where XLA runs a loop body several times slower
  # (demo iteration 0.78 -> 0.15 s), looped on GPU, where unrolling gained
  # nothing (H200: 3-5% slower) and costs compile time.
  c.train.d_steps_lowering = "auto"
  c.train.num_epochs = 500              # 195 iterations per epoch on CIFAR-10 -> 97.5k
  c.train.total_steps = 0               # > 0 overrides num_epochs
  c.train.ema_decay = 0.9999
  c.train.ema_start = 1000
  c.train.log_every = 50

  c.sample = ml_collections.ConfigDict()
  c.sample.every = 5000
  c.sample.per_row = 10
  c.sample.seed = 0
  c.sample.scale = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.metrics = ("fid",)
  c.eval.every = 5000                   # test_every
  c.eval.num_samples = 10000            # FID-10k against the 10k CIFAR-10 statistics
  c.eval.sample_batch_size = 64         # BN batch statistics over 64 samples, as official
  c.eval.inception_weights = ml_collections.FieldReference(None, field_type=str)
  c.eval.ref_stats = ml_collections.FieldReference(None, field_type=str)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = 5            # num_best_copies
  c.checkpoint.best_metric = "fid"
  c.checkpoint.best_mode = "min"
  c.checkpoint.async_save = True
  return c


def apply_gan_variants(c: ml_collections.ConfigDict, variants: set[str]) -> None:
  """Variants shared by the GAN configs: conditional model, the BigGAN baseline."""
  if "cond" in variants:                # train_C10_cond.sh
    c.model.conditional = True
  if "baseline" in variants:            # plain BigGAN: NDA weighted 0
    c.loss.alpha, c.loss.beta = 1.0, 0.0
