"""Host input pipeline throughput: the ImageNet recipes' training batches against the decode floor.

  python bench/input_pipeline.py [--num_images=400] [--repeats=3] [--workers=0,1,2]
  PYTHONPATH=.:/work/torchsite python bench/input_pipeline.py   # main_moco with torchvision

Writes a folder of natural JPEGs at ImageNet-like sizes (random crops and
rescales of scikit-learn's two sample photos, quality 90, shorter side
220-380 px, a quarter portrait) and measures, on the same files in the same run, alternating the
measurements repeat by repeat (median kept), images per second of:

  decode floor    PIL full decode + convert('RGB') of each file, one process;
  main_moco crops facebookresearch/moco's host work per image up to its crops:
                  pil_loader + TwoCropsTransform's two RandomResizedCrop(224,
                  scale (0.2, 1)) (torchvision's if importable, else
                  data/crops.py's boxes with PIL crop-then-resize BILINEAR);
  main_moco aug+  the whole aug+ of main_moco on the host, ToTensor and
                  Normalize included (only with torchvision);
  the project's imagenet_moco / imagenet_linear training pipelines
                  (pipeline.make_train_iterator on their data config) with
                  data.crops='host' (views of 224 resized on the host) and
                  data.crops='canvas' (the decoded photo in a canvas of each
                  --canvas_sizes with its boxes, resized on device: not timed
                  here; box rectangles larger than the canvas are shrunk on
                  the host),
                  each with 0 worker processes (one read thread in the main
                  process) and with each of --workers; and imagenet_moco with
                  data.crops='device' (decode at 256, centre 256x256: the
                  crops drawn on device), for comparison.

Prints img/s, the ratio to the decode floor (per core: divided by the worker
count, 1 for 0 workers), images per CPU second of the main process (and its
ratio to the floor's) and the cores one accelerator needs at
--batch_per_step x --steps_per_sec (default 256 x 3: a V100-class GPU on
ResNet-50 MoCo-v2 at batch 256, MoCo's 8-GPU run at ~0.4 s per step of 256 per
GPU being ~2.5; 3 keeps a margin). On a shared machine absolute figures move
with the load; the ratios, measured alternately on the same files, move less,
and --idle_floor turns them into cores at an idle core's decode rate.
"""
import io
import os
import tempfile
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np
from PIL import Image

from configs import imagenet_linear
from configs import imagenet_moco
from nda_jax.data import crops
from nda_jax.data import pipeline

_NUM_IMAGES = flags.DEFINE_integer("num_images", 400, "JPEGs written and read per pass.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating passes of every measurement.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"],
                             "grain worker process counts (0 is always run).")
_BATCH = flags.DEFINE_integer("batch", 25, "Host batch of the pipelines.")
_BATCH_PER_STEP = flags.DEFINE_integer("batch_per_step", 256, "Images per accelerator step.")
_STEPS_PER_SEC = flags.DEFINE_float("steps_per_sec", 3.0, "Accelerator steps per second.")
_CANVAS = flags.DEFINE_list("canvas_sizes", ["500"],
                            "data.canvas_size of the canvas rows (one set of rows each).")
_DIR = flags.DEFINE_string("dir", None, "Where to write the JPEGs (default: a temporary folder).")
_IDLE_FLOOR = flags.DEFINE_float(
    "idle_floor", 0.0, "Decode floor (img/s) of one idle core, for the cores-needed column on "
    "a loaded machine (ratio x this); 0: the floor measured here.")


def write_images(root: str, n: int, seed: int = 0) -> list[str]:
  """n JPEGs in root/train/<4 classes>/: random crops of the sample photos, rescaled."""
  from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
  photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    photo = photos[i % 2]
    h0, w0 = photo.shape[:2]
    h, w = int(h0 * rng.uniform(0.5, 1.0)), int(w0 * rng.uniform(0.5, 1.0))
    top, left = rng.integers(0, h0 - h + 1), rng.integers(0, w0 - w + 1)
    image = Image.fromarray(photo[top:top + h, left:left + w])
    if rng.uniform() < 0.25:
      image = image.transpose(Image.Transpose.TRANSPOSE)   # portrait photos too
    short = rng.uniform(220, 380)
    scale = short / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         Image.Resampling.BICUBIC)
    folder = os.path.join(root, "train", f"class{i % 4}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:05d}.jpg")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    with open(path, "wb") as f:
      f.write(buf.getvalue())
    paths.append(path)
  return paths


def decode_floor(paths: list[str]) -> None:
  for path in paths:
    with Image.open(path) as image:
      image.convert("RGB")


def _torchvision_transforms():
  try:
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  crop = transforms.RandomResizedCrop(224, scale=(0.2, 1.0))
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  aug_plus = transforms.Compose([   # main_moco.py --aug-plus
      transforms.RandomResizedCrop(224, scale=(0.2, 1.0)),
      transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
      transforms.RandomGrayscale(p=0.2),
      transforms.RandomApply([transforms.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
      transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
  return crop, aug_plus


def main_moco_crops(paths: list[str], tv) -> None:
  """pil_loader + two RandomResizedCrop(224, scale=(0.2, 1)) per image."""
  rng = np.random.default_rng(0)
  spec = crops.ViewSpec(num=2, size=224, scale=(0.2, 1.0))
  for path in paths:
    with open(path, "rb") as f:
      image = Image.open(f).convert("RGB")
    if tv is not None:
      tv[0](image), tv[0](image)
    else:
      boxes = crops.draw_boxes(rng, image.height, image.width, spec)
      crops.resized_views(image, boxes, 224, image.size)


def main_moco_aug_plus(paths: list[str], tv) -> None:
  for path in paths:
    with open(path, "rb") as f:
      image = Image.open(f).convert("RGB")
    tv[1](image), tv[1](image)


def rates(images: int, wall: float, cpu: float) -> tuple[float, float]:
  """(img/s of wall time, img per CPU second of this process's threads)."""
  return images / wall, images / max(cpu, 1e-9)


def pipeline_pass(data_cfg: ml_collections.ConfigDict, workers: int,
                  n: int) -> tuple[float, float]:
  """rates() of the training iterator over n images, after one warm-up batch."""
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.worker_count = workers
  batch = _BATCH.value
  it = pipeline.make_train_iterator(cfg, batch, seed=0, process_index=0, process_count=1)
  try:
    next(it)   # worker start-up and the first batch
    num_batches = max(1, n // batch)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
      next(it)
    return rates(num_batches * batch, time.perf_counter() - start, time.process_time() - cpu)
  finally:
    it.close()


def main(argv):
  del argv
  n = _NUM_IMAGES.value
  root = _DIR.value or tempfile.mkdtemp(prefix="nda_input_bench_")
  paths = write_images(root, n)
  sizes = np.array([Image.open(p).size for p in paths])
  print(f"{n} JPEGs in {root}: mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} "
        f"(w x h), {sum(os.path.getsize(p) for p in paths) / n / 1e3:.0f} kB each; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  canvases = [int(c) for c in _CANVAS.value]
  tv = _torchvision_transforms()

  def data(config, crops_mode, canvas=canvases[0]):
    d = ml_collections.ConfigDict(config.get_config().data.to_dict())
    d.data_dir, d.crops, d.canvas_size = root, crops_mode, canvas
    return d
  workers = [0] + [int(w) for w in _WORKERS.value if int(w) > 0]
  moco_views = int(imagenet_moco.get_config().data.views.num)
  print(f"bytes per image to the device: host views {moco_views * 224 * 224 * 3:,} (moco), "
        f"{224 * 224 * 3:,} (linear)")
  for canvas in canvases:
    print(f"canvas {canvas}: {np.mean(sizes.max(axis=1) > canvas):.0%} of the photos larger "
          "(shrunk on the host when their boxes span more than the canvas); "
          f"{canvas * canvas * 3 + 16 * moco_views:,} bytes per image (moco), "
          f"{canvas * canvas * 3 + 16:,} (linear)")

  def timed(fn):
    def run():
      start, cpu = time.perf_counter(), time.process_time()
      fn(paths)
      return rates(n, time.perf_counter() - start, time.process_time() - cpu)
    return run
  crops_name = "main_moco crops (" + ("torchvision" if tv else "PIL re-implementation") + ")"
  rows = {"PIL decode floor": (timed(decode_floor), 1),
          crops_name: (timed(lambda p: main_moco_crops(p, tv)), 1)}
  if tv is not None:
    rows["main_moco aug+ (torchvision, all on host)"] = (
        timed(lambda p: main_moco_aug_plus(p, tv)), 1)
  for config in (imagenet_moco, imagenet_linear):
    name = config.__name__.split(".")[-1]
    for w in workers:
      rows[f"{name}, host crops, {w} workers"] = (
          lambda w=w, d=data(config, "host"): pipeline_pass(d, w, n), max(w, 1))
    for canvas in canvases:
      for w in workers:
        rows[f"{name}, canvas {canvas}, {w} workers"] = (
            lambda w=w, d=data(config, "canvas", canvas): pipeline_pass(d, w, n), max(w, 1))
  rows["imagenet_moco, crops on device (decode 256), 0 workers"] = (
      lambda d=data(imagenet_moco, "device"): pipeline_pass(d, 0, n), 1)

  results = {name: [] for name in rows}
  for repeat in range(_REPEATS.value):
    for name, (fn, _) in rows.items():
      results[name].append(fn())
      wall, cpu = results[name][-1]
      print(f"pass {repeat + 1}: {name}: {wall:.0f} img/s, {cpu:.0f} img/CPU-s", flush=True)
  medians = {name: np.median(np.array(r), axis=0) for name, r in results.items()}
  floor, floor_cpu = medians["PIL decode floor"]
  core_floor = _IDLE_FLOOR.value or floor
  need = _BATCH_PER_STEP.value * _STEPS_PER_SEC.value
  print(f"\nimg/s: median of {_REPEATS.value} alternating passes; x floor per core = img/s / "
        f"cores / floor; cores for one accelerator at {_BATCH_PER_STEP.value} img/step x "
        f"{_STEPS_PER_SEC.value:g} steps/s = {need:.0f} img/s, at a floor of {core_floor:.0f} "
        f"img/s per core. img/CPU-s: images per CPU second of the main process (all its "
        f"threads; the worker processes not counted), which a loaded machine moves less than "
        f"wall time: with 0 workers all the work, with workers what stays serial.\n")
  print(f"| {'':58s} | {'img/s':>6s} | {'x floor per core':>16s} | {'cores needed':>12s} "
        f"| {'img/CPU-s':>9s} | {'x floor, CPU':>12s} |")
  print(f"|{'-' * 60}|{'-' * 8}|{'-' * 18}|{'-' * 14}|{'-' * 11}|{'-' * 14}|")
  for name, (_, cores) in rows.items():
    rate, cpu = medians[name]
    ratio = rate / cores / floor
    print(f"| {name:58s} | {rate:6.0f} | {ratio:16.2f} | {need / (ratio * core_floor):12.1f} "
          f"| {cpu:9.0f} | {cpu / floor_cpu:12.2f} |")


if __name__ == "__main__":
  app.run(main)
