"""Recipes shared by the configs (big_vision's `configs/common.py` role).

Each function returns the ConfigDict sections of a paper recipe with every
key a trainer reads declared, so any of them can be overridden on the command
line (`--config.optim.encoder.lr=0.06`) and a typo is rejected.
"""
import ml_collections

from nda_jax import evaluators
from nda_jax import optim


def parse_variants(arg: str | None, valid: tuple[str, ...]) -> set[str]:
  """'cond,baseline' -> {'cond', 'baseline'}, rejecting unknown variants by name."""
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = variants - set(valid)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; valid choices: {sorted(valid)}")
  return variants


def run_config(trainer: str, seed: int = 0) -> ml_collections.ConfigDict:
  """What every run has: trainer, seed, devices, dtype, checkpointing."""
  c = ml_collections.ConfigDict()
  c.trainer = trainer
  c.seed = seed
  c.parallel = "shard_map"              # or "pmap": same numbers
  c.max_devices = 0                     # 0: every device; n: the first n (one process)
  c.dtype = "float32"                   # activations; params, optimizer state, losses stay fp32
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = 0
  c.checkpoint.best_metric = ""
  c.checkpoint.best_mode = "min"
  c.checkpoint.async_save = True
  c.evals = ml_collections.ConfigDict()
  return c


def keep_best(c: ml_collections.ConfigDict, metric: str, mode: str = "max", keep: int = 1
              ) -> None:
  """Keeps, beside the latest ones, the `keep` checkpoints best by the evaluators' `metric`."""
  c.checkpoint.keep_best = keep
  c.checkpoint.best_metric = metric
  c.checkpoint.best_mode = mode


def evaluate_every(c: ml_collections.ConfigDict, steps: int, *evals: str) -> None:
  """Runs `evals` and saves a checkpoint every `steps` steps: one cadence, so every
  checkpoint carries the metrics that choose the best ones."""
  for name in evals:
    c.evals[name].every = steps
  c.checkpoint.every = steps


def clip_frames(model: ml_collections.ConfigDict) -> ml_collections.FieldReference:
  """A clip's frames, `model.num_seq * model.seq_len`, following overrides of either."""
  return model.get_ref("num_seq") * model.get_ref("seq_len")


def data_config(name: str, image_size: int, num_classes: int, channels: int = 3
                ) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.name = name
  d.data_dir = ml_collections.FieldReference(None, field_type=str)
  d.train_split = "train"
  d.eval_split = "test"                 # evaluators' held-out split (kNN, probes, FID refs)
  d.image_size = image_size
  d.channels = channels
  d.num_classes = num_classes
  d.read_threads = 1                    # batches prepared ahead in threads
  d.worker_count = 0                    # > 0: in grain worker processes instead
  return d


def host_views(c: ml_collections.ConfigDict, num: int, size, scale) -> None:
  """Training crops from the original photos (data/crops.py), as the reference recipes crop.

  `num` torchvision RandomResizedCrops of each original image: `c.data.crops
  = 'canvas'` ships the decoded photo in a canvas_size square with the boxes
  and the train step resizes them (the host only decodes: bench/input_pipeline.py);
  `'host'` resizes them on the host; `'device'` would crop the decoded
  image_size square in the train step instead. `size` and `scale` may be
  FieldReferences of the aug section, so one override sets both.
  """
  c.data.crops = "canvas"
  c.data.canvas_size = 500              # the longer side of most ImageNet photos (crops.py)
  c.data.views = ml_collections.ConfigDict()
  c.data.views.num = num
  c.data.views.size = size
  c.data.views.scale = scale
  c.data.views.ratio = (3 / 4, 4 / 3)   # torchvision's default


# The paper's image NDAs (Table 1), each an out-of-distribution set of the anomaly evaluator.
ANOMALY_NDAS = ("jigsaw", "stitch", "mixup", "cutout", "cutmix", "mosaic")


def gan_config() -> ml_collections.ConfigDict:
  """The official NDA-GAN recipe (train_C10.sh): BigGAN_new, hinge, jigsaw k=2, 0.25/0.75."""
  c = run_config("gan", seed=2)
  c.data = data_config("cifar10", image_size=32, num_classes=10)

  c.model = ml_collections.ConfigDict()
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
  for part in ("g", "d"):               # BigGAN-PyTorch: Adam(2e-4, betas=(0, 0.999), eps=1e-8)
    c.optim[part] = optim.default_config("adam")
    c.optim[part].lr = 2e-4
    c.optim[part].b1 = 0.0
    c.optim[part].b2 = 0.999

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.num_d_steps = 4
  # The D steps as straight-line code ("unroll") or as a lax.scan ("loop");
  # "auto": unrolled on CPU, where XLA runs a loop body several times slower,
  # looped on GPU, where unrolling gains nothing and costs compile time.
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

  c.evals.fid = evaluators.default_config("sample_quality")
  c.evals.fid.metrics = ("fid",)
  c.evals.fid.every = 5000              # test_every
  c.evals.fid.num_samples = 10000       # FID-10k against the 10k CIFAR-10 statistics
  c.evals.fid.sample_batch_size = 64    # BN batch statistics over 64 samples, as official

  # Anomaly detection (paper 4.4): AUROC of D(x), test split vs NDA(test) per
  # NDA and, with --config.evals.anomaly.cifar10c_dir=.../CIFAR-10-C (the
  # official <corruption>.npy + labels.npy; CIFAR-100-C has the same layout),
  # the 19 corruptions of the official code, at the end of training.
  c.evals.anomaly = evaluators.default_config("anomaly")
  c.evals.anomaly.ndas = ANOMALY_NDAS

  keep_best(c, "fid", mode="min", keep=5)   # num_best_copies
  return c


def apply_gan_variants(c: ml_collections.ConfigDict, variants: set[str]) -> None:
  """Variants shared by the GAN configs: conditional model, the BigGAN baseline."""
  if "cond" in variants:                # train_C10_cond.sh
    c.model.conditional = True
  if "baseline" in variants:            # plain BigGAN: NDA weighted 0
    c.loss.alpha, c.loss.beta = 1.0, 0.0


def moco_config() -> ml_collections.ConfigDict:
  """MoCo-v2 (main_moco.py --mlp --moco-t 0.2 --aug-plus --cos) with NDA negatives, ImageNet."""
  c = run_config("moco", seed=0)
  c.data = data_config("image_folder", image_size=256, num_classes=1000)
  c.data.resize_size = 256              # eval: shorter side 256, centre 256x256, centre 224

  c.model = ml_collections.ConfigDict()
  c.model.arch = "resnet50"
  c.model.stem = "imagenet"             # 'cifar': 3x3 conv, no max-pool (32x32, digits)
  c.model.width = 64
  c.model.head_dim = 128                # MLP head 2048-2048-128 (--mlp)
  c.model.mlp_head = True               # --mlp (MoCo-v2); False: MoCo v1's linear head
  c.model.bn_group_size = 32            # BN statistics per 32 examples = MoCo's 256 over 8 GPUs
  c.model.input_norm = "imagenet"       # torchvision mean/std, as MoCo (and imported weights)
  c.model.conv_impl = "auto"

  c.moco = ml_collections.ConfigDict()
  c.moco.queue_size = 65536             # K
  c.moco.momentum = 0.999               # m
  c.moco.temperature = 0.2              # --moco-t 0.2
  c.moco.monitor_features = "backbone"  # the kNN monitor's: pooled backbone, or 'head'

  c.aug = ml_collections.ConfigDict()   # aug+ (MoCo-v2): crops per data.crops, the rest on device
  c.aug.crop_size = 224
  c.aug.scale = (0.2, 1.0)
  c.aug.jitter = (0.4, 0.4, 0.4, 0.1)
  c.aug.p_jitter = 0.8
  c.aug.p_gray = 0.2
  c.aug.blur_sigma = (0.1, 2.0)
  c.aug.p_blur = 0.5
  c.aug.p_flip = 0.5
  host_views(c, num=2, size=c.aug.get_ref("crop_size"), scale=c.aug.get_ref("scale"))

  # NDA negatives: an NDA of each query's view, encoded by the key encoder.
  c.nda = ml_collections.ConfigDict()
  c.nda.enabled = True
  c.nda.name = "jigsaw"                 # any registry NDA, or 'a+b' with probs
  c.nda.probs = ml_collections.FieldReference(None, field_type=list)
  c.nda.params = ml_collections.ConfigDict({"jigsaw": {"k": 2, "layout": "clean"}})
  c.nda.source = "query_view"           # or 'image': NDA before the positive augmentation
  c.nda.scope = "own"                   # 'own': each query's own NDA key; 'batch': all of them
  c.nda.weight = 1.0                    # multiplies exp(NDA logits) in the denominator
  c.nda.enqueue = False                 # True: NDA keys also enter the queue

  c.optim = ml_collections.ConfigDict()
  c.optim.encoder = optim.default_config("sgd")
  c.optim.encoder.lr = 0.03             # 0.03 * batch / 256
  c.optim.encoder.momentum = 0.9
  c.optim.encoder.weight_decay = 1e-4   # coupled, as torch.optim.SGD
  c.optim.encoder.schedule = "cosine_epochs"   # --cos: set once per epoch

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256
  c.train.num_epochs = 200
  c.train.total_steps = 0
  c.train.log_every = 100

  # Online linear probe (solo-learn's): stop-gradient features, its own SGD; off here
  # (see imagenet_moco.py for its measured cost), on with `enable_online_probe`.
  c.online_probe = ml_collections.ConfigDict()
  c.online_probe.enabled = False
  c.online_probe.optim = optim.default_config("sgd")
  c.online_probe.optim.lr = 0.1         # solo-learn's classifier lr, no weight decay
  c.online_probe.optim.momentum = 0.9
  c.online_probe.optim.weight_decay = 0.0
  c.online_probe.optim.schedule = "cosine"

  c.evals.knn = evaluators.default_config("knn")
  c.evals.knn.max_train = 50000         # a fixed subset of ImageNet train as the feature bank
  c.evals.knn.eval_split = "val"
  evaluate_every(c, 5000, "knn")
  keep_best(c, "knn_top1")
  return c


def enable_online_probe(c: ml_collections.ConfigDict) -> None:
  """The online probe on, its test top-1 evaluated with the kNN monitor (evals.online_probe)."""
  c.online_probe.enabled = True
  c.evals.online_probe = evaluators.default_config("classification")
  c.evals.online_probe.every = c.evals.knn.every
  c.evals.online_probe.batch_size = c.evals.knn.batch_size


def video_classifier_config() -> ml_collections.ConfigDict:
  """DPC's action recognition (eval/test.py, LC model, R18 at 128 px), UCF-101 split 1.

  Fine-tuning of a DPC run (`pretrained_workdir`; '' = the untrained
  baseline) with DPC's recipe: 8 blocks x 5 frames at stride 3, batch 128
  (BN per 64 clips: DPC's README runs it on 2 GPUs), Adam 1e-3 with weight
  decay 1e-3, encoder and ConvGRU at lr / 10, lr x0.1 at DPC's epochs
  60/80/100 of 300. A clip's start is fixed per example, so each video is 10
  examples with their own starts and an epoch here is 10 of DPC's
  (boundaries 6/8/10 of 30). Checkpoints are chosen by video top-1 on a
  held-out 10% of the training list ('val', whole UCF-101 groups), where DPC
  chose them on the test list; 'test' (dense half-overlapping clips,
  softmax averaged per video) is evaluated at the end, and on the chosen
  checkpoint by `python -m nda_jax.eval --workdir=W --checkpoint=best --only=test`.
  `mode='linear'`: frozen encoder and ConvGRU, only the head trains.
  """
  c = run_config("video_classifier", seed=0)
  c.pretrained_workdir = ml_collections.FieldReference(None, field_type=str)  # a DPC workdir, or ''
  c.pretrained_checkpoint = "latest"    # 'latest' | 'best' | a step
  c.mode = "finetune"                   # or 'linear'
  c.data = data_config("ucf101", image_size=240, num_classes=101)
  c.data.resize_size = 240              # DPC's frames: 320x240, shorter side 240 ...
  c.data.frame_width = 320              # ... kept whole: the random crops see all of it
  c.data.frame_stride = 3               # DPC's --ds 3
  c.data.split_number = 1
  c.data.splits_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.clips_per_video = 10
  c.data.clip_seed = 0
  c.data.val_fraction = 0.1             # of the training list's groups, held out as 'val'

  c.model = ml_collections.ConfigDict()  # must match the pretrained run's architecture
  c.model.depth = 18
  c.model.width = 64                    # 256-d features
  c.model.num_seq = 8                   # blocks per clip
  c.model.seq_len = 5
  c.data.num_frames = clip_frames(c.model)
  c.model.gru_kernel = 1
  c.model.gru_dropout = 0.1             # DPC's ConvGRU dropout, on while fine-tuning
  c.model.head_dropout = 0.5
  c.model.bn_group_size = 64
  c.model.input_norm = "imagenet"
  c.model.conv_impl = "auto"

  c.aug = ml_collections.ConfigDict()   # DPC's fine-tuning views, one draw per clip
  c.aug.crop_size = 224                 # evaluation: central 224 of the 320x240 frames ...
  c.aug.out_size = 128                  # ... scaled to 128 (the model's input)
  c.aug.scale = (0.5, 1.0)              # RandomSizedCrop's area
  c.aug.ratio = (3 / 4, 4 / 3)
  c.aug.jitter = (0.5, 0.5, 0.5, 0.25)
  c.aug.p_jitter = 0.3
  c.aug.p_flip = 0.5

  c.optim = optim.default_config("adam")
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-3           # coupled, as torch.optim.Adam
  c.optim.schedule = "steps"
  c.optim.boundaries_epochs = (6, 8, 10)
  c.optim.decay_factor = 0.1
  c.optim.lr_mults = ml_collections.ConfigDict({"encoder": 0.1, "agg": 0.1})

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_epochs = 30
  c.train.total_steps = 0
  c.train.log_every = 50

  c.evals.val = evaluators.default_config("video_classification")
  c.evals.val.split = "val"
  c.evals.test = evaluators.default_config("video_classification")
  c.evals.test.split = "test"
  evaluate_every(c, 660, "val")         # ~one epoch: 10 x ~8.5k training videos / 128
  keep_best(c, "val_video_top1")
  return c


def dpc_config() -> ml_collections.ConfigDict:
  """DPC (TengdaHan/DPC, R18, 128 px, 8 blocks x 5 frames, predict 3) with NDA negatives, UCF-101.

  The recipe of DPC's UCF-101 -> UCF-101 result (its issue #11): 32 clips per GPU
  (here: BN and candidate groups of 32 of a 128-clip batch, as on DPC's 4 GPUs),
  Adam 1e-3 for 400 epochs then 1e-4 for 70. A clip's start is fixed per example,
  so each video is 10 examples with their own starts and an epoch here is 10 of
  DPC's (47 x 10 = 470).
  """
  c = run_config("dpc", seed=0)
  c.data = data_config("ucf101", image_size=240, num_classes=101)
  c.data.resize_size = 240              # DPC's frames: 320x240, shorter side 240 ...
  c.data.frame_width = 320              # ... kept whole: the random crops see all of it
  c.data.frame_stride = 3               # DPC's --ds 3
  c.data.split_number = 1
  c.data.splits_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.clips_per_video = 10
  c.data.clip_seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.depth = 18                    # R2D3D-18
  c.model.width = 64                    # 256-d features
  c.model.num_seq = 8
  c.model.seq_len = 5
  c.data.num_frames = clip_frames(c.model)
  c.model.pred_step = 3
  c.model.gru_kernel = 1
  c.model.gru_dropout = 0.1
  c.model.bn_group_size = 32            # BN statistics per 32 clips = DPC's per-GPU batch
  c.model.input_norm = "imagenet"       # DPC's Normalize(): ImageNet mean/std
  c.model.conv_impl = "auto"

  c.dpc = ml_collections.ConfigDict()
  c.dpc.candidate_group_size = 32       # DPC's per-GPU candidates; 0: the global batch

  c.aug = ml_collections.ConfigDict()   # DPC's UCF-101 views, made on device
  c.aug.crop_size = 224                 # RandomCrop(224) of the 320x240 frames ...
  c.aug.out_size = 128                  # ... scaled to 128 (the model's input)
  c.aug.jitter = (0.5, 0.5, 0.5, 0.25)  # per frame, p = 1
  c.aug.p_gray = 0.5                    # per frame
  c.aug.p_flip = 0.5                    # per clip

  # NDA negatives: NDA clips of the future blocks (see trainers/dpc.py for the default).
  c.nda = ml_collections.ConfigDict()
  c.nda.enabled = True
  c.nda.name = "spatial_jigsaw+block_frame_shuffle"
  c.nda.probs = ml_collections.FieldReference(None, field_type=list)
  c.nda.params = ml_collections.ConfigDict({"spatial_jigsaw": {"k": 2, "layout": "clean"},
                                            "frame_jigsaw": {"k": 2, "layout": "clean"}})
  c.nda.scope = "same_position"         # or 'all': every NDA position and step of the clip
  c.nda.weight = 1.0                    # multiplies exp(NDA logits) in the denominator

  c.optim = ml_collections.ConfigDict()
  c.optim.encoder = optim.default_config("adam")
  c.optim.encoder.lr = 1e-3
  c.optim.encoder.weight_decay = 1e-5   # coupled, as torch.optim.Adam
  c.optim.encoder.schedule = "steps"
  c.optim.encoder.boundaries_epochs = (40,)
  c.optim.encoder.decay_factor = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_epochs = 47
  c.train.total_steps = 0
  c.train.log_every = 50

  # No evaluator: UCF-101 is evaluated by fine-tuning; a kNN monitor would decode
  # every training clip (95k x 40 frames) each time.
  c.checkpoint.every = 745              # one epoch
  return c


def linear_config() -> ml_collections.ConfigDict:
  """Linear classification on a frozen MoCo encoder (main_lincls.py), ImageNet.

  The encoder's description (model, crop size) comes from the pretrained run's
  config.json; only the probe's own settings are here.
  """
  c = run_config("linear_probe", seed=0)
  c.pretrained_workdir = ml_collections.FieldReference(None, field_type=str)  # a MoCo workdir
  c.pretrained_checkpoint = "latest"    # 'latest' | 'best' | a step
  c.data = data_config("image_folder", image_size=256, num_classes=1000)
  c.data.resize_size = 256              # eval: shorter side 256, centre 256x256, centre 224
  c.data.eval_split = "val"

  c.aug = ml_collections.ConfigDict()   # training views (flip on device); eval center-crops
  c.aug.scale = (0.08, 1.0)             # RandomResizedCrop's default
  c.aug.p_flip = 0.5
  # The encoder's crop size (its aug.crop_size, read from the pretrained run).
  host_views(c, num=1, size=224, scale=c.aug.get_ref("scale"))

  c.optim = ml_collections.ConfigDict()
  c.optim.classifier = optim.default_config("sgd")
  c.optim.classifier.lr = 30.0
  c.optim.classifier.momentum = 0.9
  c.optim.classifier.weight_decay = 0.0
  c.optim.classifier.schedule = "steps"
  c.optim.classifier.boundaries_epochs = (60, 80)
  c.optim.classifier.decay_factor = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256
  c.train.num_epochs = 100
  c.train.total_steps = 0
  c.train.log_every = 100

  c.evals.classification = evaluators.default_config("classification")
  evaluate_every(c, 5004, "classification")  # one ImageNet epoch at batch 256, as main_lincls
  keep_best(c, "val_top1")
  return c


def moco_cifar_config(name: str, num_classes: int) -> ml_collections.ConfigDict:
  """MoCo's CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb) with NDA negatives.

  ResNet-18 with the CIFAR stem and a linear head 512 -> 128, K=4,096, m=0.99,
  t=0.1, SGD lr 0.06 at batch 512 (cosine, set once per epoch), momentum 0.9,
  weight decay 5e-4, 200 epochs, BN in 8 groups of 64 (its SplitBatchNorm,
  --bn-splits 8), the dataset's mean/std, its views (RandomResizedCrop(32) at
  torchvision's default scale, flip, colour jitter, grayscale; no blur) and its
  kNN monitor on the head's outputs (k=200, t=0.1, train split as the bank,
  test split as queries).
  """
  c = moco_config()
  c.data = data_config(name, image_size=32, num_classes=num_classes)
  c.model.arch = "resnet18"
  c.model.stem = "cifar"
  c.model.width = 64
  c.model.head_dim = 128                # --moco-dim
  c.model.mlp_head = False              # the demo's fc: one linear layer
  c.model.bn_group_size = 64            # 512 / --bn-splits 8
  c.model.input_norm = name             # transforms.Normalize of the dataset's mean/std
  c.moco.queue_size = 4096
  c.moco.momentum = 0.99
  c.moco.temperature = 0.1
  c.moco.monitor_features = "head"      # the demo's kNN reads net(x), the 128-d output
  c.aug.crop_size = 32
  c.aug.scale = (0.08, 1.0)             # RandomResizedCrop(32)'s default
  c.aug.p_blur = 0.0
  c.optim.encoder.lr = 0.06             # 0.06 at batch 512
  c.optim.encoder.weight_decay = 5e-4
  c.train.batch_size = 512
  c.train.num_epochs = 200
  c.evals.knn.max_train = 0             # the whole train split as the bank
  c.evals.knn.eval_split = "test"
  evaluate_every(c, 97, "knn")          # one epoch: 50,000 // 512 steps (drop_last)
  return c


def apply_moco_cifar_variants(c: ml_collections.ConfigDict, variants: set[str]) -> None:
  """`v2`: MoCo-v2's MLP head and aug+ (main_moco.py --mlp --aug-plus); `baseline`: plain
  MoCo, no NDA negatives."""
  if "v2" in variants:
    c.model.mlp_head = True
    c.aug.scale = (0.2, 1.0)
    c.aug.p_blur = 0.5
  if "baseline" in variants:
    c.nda.enabled = False
