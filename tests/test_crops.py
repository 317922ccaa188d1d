"""Host-side RandomResizedCrop of the original image (data/crops.py, data.crops='host').

References: a NumPy re-implementation of torchvision's
`RandomResizedCrop.get_params` written here (vectorised over examples, its own
random stream), PIL's crop-then-resize with BILINEAR (torchvision's
`F.resized_crop` on a PIL image), and torchvision itself where it is installed.
"""
import io
import math
import re

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
from scipy import stats
from sklearn.datasets import load_sample_image

import step_spy

from configs import demo_linear
from configs import demo_moco
from nda_jax import images
from nda_jax.augment import positive
from nda_jax.data import crops
from nda_jax.data import pipeline
from nda_jax.importers import save
from nda_jax.trainers import common
from nda_jax.trainers import linear_probe
from nda_jax.trainers import loop
from nda_jax.trainers import moco

SHAPES = [(375, 500), (500, 375), (256, 256), (64, 1000)]   # (height, width)
N = 20_000
# Each KS comparison rejects at p < 1e-3; 16 comparisons (4 shapes x 4 statistics)
# falsely fail together with probability <= 1.6% for a correct sampler. The seeds
# are fixed, so the outcome is deterministic; the negative control below shows
# the test rejects the old design (boxes drawn in the central square).
P_MIN = 1e-3


def torchvision_boxes(rng: np.random.Generator, n: int, height: int, width: int,
                      scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """[n, 4] (top, left, h, w): torchvision's get_params, all n examples at once."""
  area = height * width
  target = area * rng.uniform(scale[0], scale[1], (n, 10))
  aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, 10)))
  w = np.round(np.sqrt(target * aspect)).astype(np.int64)   # ties: both round half to even
  h = np.round(np.sqrt(target / aspect)).astype(np.int64)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = np.argmax(ok, axis=1)
  found = ok[np.arange(n), first]
  h, w = h[np.arange(n), first], w[np.arange(n), first]
  in_ratio = width / height
  if in_ratio < min(ratio):
    fw, fh = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    fw, fh = round(height * max(ratio)), height
  else:
    fw, fh = width, height
  h, w = np.where(found, h, fh), np.where(found, w, fw)
  top = np.where(found, np.floor(rng.uniform(size=n) * (height - h + 1)), (height - h) // 2)
  left = np.where(found, np.floor(rng.uniform(size=n) * (width - w + 1)), (width - w) // 2)
  return np.stack([top, left, h, w], axis=1).astype(np.int64)


def statistics(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
  top, left, h, w = boxes.T.astype(np.float64)
  return {"area": h * w / (height * width), "aspect": w / h,
          "centre_x": (left + w / 2) / width, "centre_y": (top + h / 2) / height}


def pipeline_boxes(height: int, width: int, spec: crops.ViewSpec, seed=0, epoch=0):
  """The boxes the pipeline draws for records 0..N/num-1 (each record's own generator)."""
  return np.array([box for i in range(N // spec.num)
                   for box in crops.draw_boxes(crops.example_rng(seed, epoch, i), height,
                                               width, spec)])


@pytest.mark.parametrize("height, width", SHAPES)
def test_box_distribution_matches_torchvision(height, width):
  spec = crops.ViewSpec(num=2, size=224, scale=(0.2, 1.0))
  ours = statistics(pipeline_boxes(height, width, spec), height, width)
  ref = statistics(torchvision_boxes(np.random.default_rng(1), N, height, width),
                   height, width)
  for name in ours:
    p = stats.ks_2samp(ours[name], ref[name]).pvalue
    assert p > P_MIN, (name, p)
  assert 0 < ours["area"].min() and ours["area"].max() <= 1


def test_extreme_shape_takes_the_clamped_central_box():
  # 64x1000: no box of >= 20% of the area fits a 3/4..4/3 ratio, so every draw falls
  # back to the central 64 x round(64 * 4/3) box.
  boxes = pipeline_boxes(64, 1000, crops.ViewSpec(num=2, size=32, scale=(0.2, 1.0)))
  np.testing.assert_array_equal(boxes, [[0, (1000 - 85) // 2, 64, 85]] * len(boxes))


def test_the_test_rejects_boxes_drawn_in_the_central_square():
  """The design before host crops: the box drawn in the central 375x375 of a 500x375 photo."""
  height, width = 375, 500
  rng = np.random.default_rng(2)
  square = torchvision_boxes(rng, N, height, height)
  square[:, 1] += (width - height) // 2
  ref = statistics(torchvision_boxes(np.random.default_rng(1), N, height, width),
                   height, width)
  old = statistics(square, height, width)
  assert stats.ks_2samp(old["area"], ref["area"]).pvalue < P_MIN
  assert stats.ks_2samp(old["centre_x"], ref["centre_x"]).pvalue < P_MIN


def _photo(tmp_path, name="china.jpg", quality=90) -> str:
  path = str(tmp_path / name)
  Image.fromarray(load_sample_image(name)).save(path, "JPEG", quality=quality)
  return path


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_full_scale_view_is_pil_crop_then_bilinear_resize(tmp_path, name):
  path = _photo(tmp_path, name)
  full = Image.open(path).convert("RGB")
  spec = crops.ViewSpec(num=2, size=224, scale=(0.2, 1.0))
  for i in range(20):
    views = crops.decode_views(path, spec, crops.example_rng(0, 0, i), reduce=False)
    boxes = crops.draw_boxes(crops.example_rng(0, 0, i), full.height, full.width, spec)
    for view, (top, left, h, w) in zip(views, boxes):
      ref = full.crop((left, top, left + w, top + h)).resize((224, 224),
                                                            Image.Resampling.BILINEAR)
      np.testing.assert_array_equal(view, np.asarray(ref))


def test_view_matches_torchvision_resized_crop(tmp_path):
  pytest.importorskip("torchvision")
  from torchvision.transforms import functional as tvf  # pylint: disable=g-import-not-at-top
  path = _photo(tmp_path)
  full = Image.open(path).convert("RGB")
  spec = crops.ViewSpec(num=1, size=224, scale=(0.08, 1.0))
  for i in range(10):
    view, = crops.decode_views(path, spec, crops.example_rng(3, 1, i))
    (top, left, h, w), = crops.draw_boxes(crops.example_rng(3, 1, i), full.height,
                                          full.width, spec)
    assert crops.draft_scale([(top, left, h, w)], 224) == 1   # 640x427: full scale
    ref = tvf.resized_crop(full, top, left, h, w, [224, 224],
                           interpolation=tvf.InterpolationMode.BILINEAR)
    np.testing.assert_array_equal(view, np.asarray(ref))


# Reduced decodes (Image.draft) against full-scale crop-then-resize, measured on this
# module's two photos with 300 views each at sizes 32 and 64: mean |difference| per
# view 0.85-1.62 on average, worst view 2.9, in units of 1/255 (libjpeg's DCT scaling is
# a box prefilter; a full decode followed by Image.reduce differs by as much). Bounds:
# 2.0 on average and 4.0 for any view.
MEAN_BOUND, WORST_BOUND = 2.0, 4.0


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
@pytest.mark.parametrize("size", [32, 64])
def test_reduced_decode_is_close_to_full_scale(tmp_path, name, size):
  path = _photo(tmp_path, name)
  spec = crops.ViewSpec(num=1, size=size, scale=(0.2, 1.0))
  errors, reduced = [], 0
  for i in range(100):
    box, = crops.draw_boxes(crops.example_rng(0, 0, i), 427, 640, spec)
    reduced += crops.draft_scale([box], size) > 1
    fast = crops.decode_views(path, spec, crops.example_rng(0, 0, i))
    exact = crops.decode_views(path, spec, crops.example_rng(0, 0, i), reduce=False)
    errors.append(np.abs(fast.astype(np.int32) - exact).mean())
  assert reduced >= 50           # the reduced path is what is measured
  assert np.mean(errors) <= MEAN_BOUND and max(errors) <= WORST_BOUND, (
      np.mean(errors), max(errors))


def test_draft_scale_keeps_two_output_pixels_per_decoded_pixel():
  assert crops.draft_scale([(0, 0, 447, 1000)], 224) == 1
  assert crops.draft_scale([(0, 0, 896, 1000)], 224) == 2
  assert crops.draft_scale([(0, 0, 896, 1000), (0, 0, 500, 500)], 224) == 1
  assert crops.draft_scale([(0, 0, 512, 512)], 32) == 8


def test_grayscale_and_png_images_become_rgb_views(tmp_path):
  gray = tmp_path / "g.jpg"
  Image.fromarray(load_sample_image("flower.jpg")).convert("L").save(gray, quality=90)
  png = tmp_path / "p.png"
  Image.fromarray(load_sample_image("flower.jpg")[:300, :200]).save(png)
  spec = crops.ViewSpec(num=2, size=16, scale=(0.2, 1.0))
  for path in (gray, png):
    views = crops.decode_views(str(path), spec, crops.example_rng(0, 0, 0))
    assert views.shape == (2, 16, 16, 3) and views.dtype == np.uint8
  views = crops.decode_views(str(gray), spec, crops.example_rng(0, 0, 0))
  np.testing.assert_array_equal(views[..., 0], views[..., 2])


# ---------------------------------------------------------------- through the pipeline
def _folder(tmp_path, per_class=5) -> str:
  """Two classes of photos of different shapes (crops of the sample images)."""
  root = tmp_path / "images"
  for label, name in enumerate(("china.jpg", "flower.jpg")):
    photo = load_sample_image(name)
    (root / "train" / f"c{label}").mkdir(parents=True)
    for i in range(per_class):
      h, w = 200 + 37 * i, 300 - 29 * i
      buf = io.BytesIO()
      Image.fromarray(photo[i * 11:i * 11 + h, i * 13:i * 13 + w]).save(buf, "JPEG", quality=90)
      (root / "train" / f"c{label}" / f"{i}.jpg").write_bytes(buf.getvalue())
  return str(root)


def _cfg(root, **kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": "image_folder", "data_dir": root, "image_size": 32, "resize_size": 32,
      "crops": "host", "views": dict(num=2, size=24, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)),
      **kw})


def _batches(cfg, n, state=None, **kw):
  it = pipeline.make_train_iterator(cfg, 4, seed=7, process_index=0, process_count=1, **kw)
  try:
    if state is not None:
      it.set_state(state)
    out = [next(it) for _ in range(n)]
    return out, it.get_state()
  finally:
    it.close()


def test_pipeline_yields_views_and_resumes_bit_exactly(tmp_path):
  cfg = _cfg(_folder(tmp_path))
  straight, _ = _batches(cfg, 5)
  assert straight[0]["image"].shape == (4, 2, 24, 24, 3)
  assert straight[0]["image"].dtype == np.uint8
  _, state = _batches(cfg, 2)
  resumed, _ = _batches(cfg, 3, state)   # a fresh iterator at the saved position
  for a, b in zip(straight[2:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  for b in straight:                     # an example's two views are different crops
    assert all(not np.array_equal(v[0], v[1]) for v in b["image"])


def test_worker_processes_give_the_same_views(tmp_path):
  cfg = _cfg(_folder(tmp_path))
  threads, _ = _batches(cfg, 3)
  cfg.worker_count = 1
  workers, _ = _batches(cfg, 3)
  for a, b in zip(threads, workers):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_a_record_gets_new_boxes_every_epoch(tmp_path):
  """10 records, batches of 4 over 2 epochs (drop_remainder: 2 batches an epoch)."""
  root = _folder(tmp_path)
  cfg = _cfg(root, views=dict(num=1, size=24, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)))
  batches, _ = _batches(cfg, 10, num_epochs=5)
  epoch = [np.concatenate([b["image"] for b in batches[2 * e:2 * e + 2]]) for e in range(5)]
  # Per epoch the shuffle differs too, so compare each record's view by where the
  # record is: every view of epoch 1 differs from every view of epoch 0.
  assert not any(np.array_equal(a, b) for a in epoch[0] for b in epoch[1])
  # The boxes are a function of (seed, epoch, record) only.
  a = crops.draw_boxes(crops.example_rng(7, 0, 3), 300, 400, crops.ViewSpec(1, 24))
  b = crops.draw_boxes(crops.example_rng(7, 1, 3), 300, 400, crops.ViewSpec(1, 24))
  assert a != b and a == crops.draw_boxes(crops.example_rng(7, 0, 3), 300, 400,
                                          crops.ViewSpec(1, 24))


def test_host_crops_need_an_image_folder_and_views(tmp_path):
  cfg = ml_collections.ConfigDict(dict(name="digits", image_size=16, crops="host",
                                       views=dict(num=2, size=8, scale=(0.2, 1.0),
                                                  ratio=(3 / 4, 4 / 3))))
  with pytest.raises(ValueError, match="crops=device"):
    pipeline.make_train_iterator(cfg, 4, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="valid choices"):
    pipeline.view_spec(ml_collections.ConfigDict(dict(crops="gpu")))
  with pytest.raises(ValueError, match="needs config.data.views"):
    pipeline.view_spec(ml_collections.ConfigDict(dict(crops="host")))
  assert pipeline.view_spec(ml_collections.ConfigDict(dict(name="digits"))) is None
  assert math.isclose(pipeline.view_spec(_cfg(str(tmp_path))).ratio[1], 4 / 3)


# ---------------------------------------------------------------- the trainers on host views
def _host_crop_config(c, root, num):
  c.data = ml_collections.ConfigDict({**c.data.to_dict(), "name": "image_folder",
                                      "data_dir": root, "image_size": 16, "resize_size": 16,
                                      "num_classes": 2})
  c.data.crops = "host"
  c.data.views = dict(num=num, size=16, scale=tuple(c.aug.scale), ratio=(3 / 4, 4 / 3))
  return c


def test_moco_checks_its_host_views(tmp_path):
  c = _host_crop_config(demo_moco.get_config("tiny"), str(tmp_path), num=2)
  c.checkpoint.async_save = False
  method = moco.MoCo(c)
  method.validate(8)
  c.data.views.scale = (0.08, 1.0)
  with pytest.raises(ValueError, match=r"config.data.views=.*'scale': \(0.08, 1.0\)"):
    moco.MoCo(c).validate(8)
  c.data.views.scale = tuple(c.aug.scale)
  c.data.crops = "hots"
  with pytest.raises(ValueError, match=r"config.data.crops='hots'; valid choices"):
    moco.MoCo(c).validate(8)
  c.data.crops = "host"
  c.nda.source = "image"
  with pytest.raises(ValueError, match="nda.source='image'.*crops=device"):
    moco.MoCo(c).validate(8)


def test_mocov2_aug_without_crop_keeps_the_view():
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3), minval=-1, maxval=1)
  kw = dict(p_jitter=0.0, p_gray=0.0, p_blur=0.0, crop=False)
  same = positive.mocov2_aug(jax.random.PRNGKey(1), images, 16, p_flip=0.0, **kw)
  np.testing.assert_allclose(same, images, atol=1e-6)
  flipped = positive.mocov2_aug(jax.random.PRNGKey(1), images, 16, p_flip=1.0, **kw)
  np.testing.assert_allclose(flipped, images[:, :, ::-1], atol=1e-6)
  with pytest.raises(ValueError, match="crop=False takes views of out_size"):
    positive.mocov2_aug(jax.random.PRNGKey(1), images, 8, **kw)


@pytest.mark.parametrize("where, shape", [("host", (1, 16, 16, 3)), ("canvas", (64, 64, 3))])
def test_linear_probe_trains_on_host_views(tmp_path, monkeypatch, where, shape):
  """One probe step on [B, 1, S, S, 3] host crops of an image folder, or on its photos
  in canvases with their boxes."""
  pretrained = tmp_path / "moco"
  config = demo_moco.get_config("tiny")
  save.save_imported(str(pretrained), config,
                     moco.MoCo(config).init_state(jax.random.PRNGKey(0)))
  root = _folder(tmp_path, per_class=8)
  (tmp_path / "images" / "test").symlink_to(tmp_path / "images" / "train")
  c = _host_crop_config(demo_linear.get_config("tiny"), root, num=1)
  c.data.crops, c.data.canvas_size = where, 64
  c.pretrained_workdir = str(pretrained)
  c.train.total_steps = 1
  c.train.batch_size = 16
  c.checkpoint.async_save = False
  seen = step_spy.record_batches(monkeypatch, linear_probe.LinearProbe)
  loop.train_and_evaluate(c, str(tmp_path / "probe"))
  assert seen and all(s == (np.uint8, (16 // 8, *shape)) for s in seen), seen
  records = common.read_metrics(str(tmp_path / "probe"))
  assert [r["step"] for r in records if "loss" in r] == [1]
  c.data.views.size = 24
  with pytest.raises(ValueError, match="config.data.views="):
    loop.check_config(c)


# ---------------------------------------------------------------- canvas: boxes resized on device
# PIL resizes 8-bit images in two passes (horizontal, then vertical), rounding to uint8 after
# each, with non-negative weights summing to 1: its view is within 0.5 + 0.5 of the exact
# float result (plus 2^-22 fixed-point weights, ~1e-4 of 255). `resized_crops` computes the
# exact result in float32, so |view - PIL| <= 1 + 1e-3 in units of 1/255. Measured on this
# module's two photos (80 views at 224 from boxes of 120-640 px, canvas 640): max 1.000,
# mean per view 0.23-0.30 (the final rounding alone averages 0.25). MEAN bound 0.4.
CANVAS_MAX, CANVAS_MEAN = 1.0 + 1e-3, 0.4


def _canvas(path, spec, canvas, rng):
  out = np.zeros((canvas, canvas, 3), np.uint8)
  return out, crops.decode_canvas(path, spec, rng, out)


def _region(boxes) -> tuple[int, int, int, int]:
  """(top, left, bottom, right) of the smallest rectangle holding the boxes."""
  b = np.asarray(boxes)
  return b[:, 0].min(), b[:, 1].min(), (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()


_resized = jax.jit(images.resized_crops, static_argnums=2)


def _pil_views(full, boxes, size):
  return np.stack([np.asarray(full.crop((left, top, left + w, top + h)).resize(
      (size, size), Image.Resampling.BILINEAR)) for top, left, h, w in boxes]).astype(np.float64)


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_canvas_view_is_pil_crop_then_bilinear_resize(tmp_path, name):
  """Boxes smaller (upscaled) and larger (downscaled, antialiased) than the view."""
  path = _photo(tmp_path, name)
  full = Image.open(path).convert("RGB")
  spec = crops.ViewSpec(num=2, size=224, scale=(0.08, 1.0))
  diffs, sides, leaky = [], [], []
  for i in range(20):
    canvas, boxes = _canvas(path, spec, 640, crops.example_rng(0, 0, i))
    original = crops.draw_boxes(crops.example_rng(0, 0, i), full.height, full.width, spec)
    top, left, _, _ = _region(original)   # the photo fits: boxes only moved with the rectangle
    np.testing.assert_array_equal(boxes, np.array(original) - [top, left, 0, 0])
    views = np.asarray(_resized(canvas[None], boxes[None], 224))[0]
    ref = _pil_views(full, original, 224)
    diffs += [np.abs(v - r) for v, r in zip(views, ref)]
    sides += [(h, w) for _, _, h, w in original]
    # PIL's resize(box=...) lets pixels just outside the box reach its edges; torchvision
    # (and resized_crops) crop first. The bound tells the two apart.
    leaky += [np.abs(views[k] - np.asarray(full.resize(
        (224, 224), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))).max()
              for k, (top, left, h, w) in enumerate(original)]
  sides = np.array(sides)
  assert (sides < 224).all(1).sum() >= 5 and (sides > 224).all(1).sum() >= 5, sides
  worst, mean = max(d.max() for d in diffs), max(d.mean() for d in diffs)
  assert worst <= CANVAS_MAX and mean <= CANVAS_MEAN, (worst, mean)
  assert np.median(leaky) > 3 * CANVAS_MAX, np.median(leaky)


def test_scale_and_translate_is_not_crop_then_resize(tmp_path):
  """Why resized_crops has its own weights: jax.image.scale_and_translate renormalises over
  the whole canvas, so the box's neighbours reach its edge pixels."""
  path = _photo(tmp_path)
  full = Image.open(path).convert("RGB")
  spec = crops.ViewSpec(num=2, size=224, scale=(0.08, 1.0))
  canvas, boxes = _canvas(path, spec, 640, crops.example_rng(0, 0, 0))
  ref = _pil_views(full, crops.draw_boxes(crops.example_rng(0, 0, 0), 427, 640, spec), 224)
  for (top, left, h, w), r in zip(boxes, ref):
    view = jax.image.scale_and_translate(
        canvas.astype(np.float32), (224, 224, 3), (0, 1), np.array([224 / h, 224 / w]),
        np.array([-top * 224 / h, -left * 224 / w]), "linear", antialias=True)
    inner = np.abs(np.asarray(view) - r)[3:-3, 3:-3]   # away from the edges: the same filter
    assert inner.max() <= CANVAS_MAX and np.abs(np.asarray(view) - r).max() > 3 * CANVAS_MAX


def test_canvas_holds_the_boxes_rectangle_and_shrinks_larger_ones(tmp_path):
  path = _photo(tmp_path)                                # 640 x 427
  full = np.asarray(Image.open(path).convert("RGB"))
  spec = crops.ViewSpec(num=2, size=32, scale=(0.2, 1.0))
  canvas, boxes = _canvas(path, spec, 700, crops.example_rng(1, 2, 3))
  original = crops.draw_boxes(crops.example_rng(1, 2, 3), 427, 640, spec)
  top, left, bottom, right = _region(original)
  np.testing.assert_array_equal(canvas[:bottom - top, :right - left], full[top:bottom, left:right])
  assert not canvas[bottom - top:].any() and not canvas[:, right - left:].any()
  assert boxes.dtype == np.float32 and boxes.shape == (2, 4)
  np.testing.assert_array_equal(boxes, np.array(original) - [top, left, 0, 0])
  # Boxes of the whole photo (no box of area 1 has a ratio other than the photo's 1.499, so
  # torchvision falls back to the whole photo), 640 px wide in a 320 canvas: a half-size
  # DCT-scaled decode, boxes halved with it.
  whole = crops.ViewSpec(num=2, size=32, scale=(1.0, 1.0), ratio=(1.4, 1.6))
  assert crops.draw_boxes(crops.example_rng(0, 0, 0), 427, 640, whole) == [(0, 0, 427, 640)] * 2
  assert crops.fitted_size(640, 427, 320) == (320, 214)
  small, halved = _canvas(path, whole, 320, crops.example_rng(0, 0, 0))
  assert small[:214, :320].any(-1).mean() > 0.9 and not small[214:].any()
  np.testing.assert_allclose(halved, [[0, 0, 214, 320]] * 2, rtol=1e-6)
  assert crops.fitted_size(300, 1000, 500) == (150, 500)
  assert crops.fitted_size(10, 5000, 500) == (1, 500)


# A rectangle larger than the canvas is shrunk first, so its views are resized from fewer
# pixels. Measured (both photos in a 400 canvas: the 12 of 20 examples whose boxes span more
# than 400 px, rectangles shrunk to 0.62-0.95, against PIL on the full photo): mean |difference|
# per view 0.9-2.5 of 255 on average, worst view 7.2. Bounds: 3.5 on average, 10 for any view
# (boxes misplaced by a pixel, or padding read, are off by tens at edges).
SHRUNK_MEAN, SHRUNK_WORST = 3.5, 10.0


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_views_of_a_shrunk_rectangle_stay_close(tmp_path, name):
  path = _photo(tmp_path, name)
  full = Image.open(path).convert("RGB")
  spec = crops.ViewSpec(num=2, size=224, scale=(0.08, 1.0))
  errors = []
  for i in range(20):
    original = crops.draw_boxes(crops.example_rng(0, 0, i), 427, 640, spec)
    top, left, bottom, right = _region(original)
    if max(bottom - top, right - left) <= 400:
      continue
    canvas, boxes = _canvas(path, spec, 400, crops.example_rng(0, 0, i))
    views = np.asarray(_resized(canvas[None], boxes[None], 224))[0]
    errors += [np.abs(v - r).mean() for v, r in zip(views, _pil_views(full, original, 224))]
  assert len(errors) >= 2 * 10
  assert np.mean(errors) <= SHRUNK_MEAN and max(errors) <= SHRUNK_WORST, (
      np.mean(errors), max(errors))


def _canvas_cfg(root, **kw):
  return _cfg(root, crops="canvas", canvas_size=360, **kw)


def test_canvas_pipeline_resumes_bit_exactly_and_matches_host_views(tmp_path):
  """The canvas batches' views are the host mode's views of the same records (views of 128
  from photos of 200-350 px: never drafted, so the host's views are PIL's exactly)."""
  root = _folder(tmp_path)
  views = dict(num=2, size=128, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
  cfg = _canvas_cfg(root, views=views)
  straight, _ = _batches(cfg, 5)
  assert straight[0]["image"].shape == (4, 360, 360, 3) and straight[0]["image"].dtype == np.uint8
  assert straight[0]["boxes"].shape == (4, 2, 4) and straight[0]["boxes"].dtype == np.float32
  _, state = _batches(cfg, 2)
  resumed, _ = _batches(cfg, 3, state)
  cfg.worker_count = 1
  workers, _ = _batches(cfg, 5)
  for a, b in zip(straight[2:] + straight, resumed + workers):
    for key in ("image", "boxes", "label"):
      np.testing.assert_array_equal(a[key], b[key])
  host, _ = _batches(_cfg(root, views=views), 5)
  for c, h in zip(straight, host):
    np.testing.assert_array_equal(c["label"], h["label"])
    device = np.asarray(_resized(c["image"], c["boxes"], 128))
    assert np.abs(device - h["image"]).max() <= CANVAS_MAX


def test_canvas_config_errors(tmp_path):
  root = _folder(tmp_path)
  for size in (None, 16, 24.0, "500"):   # the views are 24 px
    cfg = _cfg(root, crops="canvas", canvas_size=size)
    with pytest.raises(ValueError, match=r"(?s)canvas_size.*at least the view size.*"
                                         rf"got {re.escape(repr(size))}\. Set"):
      pipeline.make_train_iterator(cfg, 4, seed=0, process_index=0, process_count=1)
  cfg = ml_collections.ConfigDict(dict(name="digits", image_size=16, crops="canvas",
                                       canvas_size=16, views=dict(num=2, size=8, scale=(0.2, 1.0),
                                                                  ratio=(3 / 4, 4 / 3))))
  with pytest.raises(ValueError, match="crops='canvas' crops the original images.*crops=device"):
    pipeline.make_train_iterator(cfg, 4, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="crops='canvas' needs config.data.views"):
    pipeline.canvas_size(ml_collections.ConfigDict(dict(crops="canvas", canvas_size=500)))
  assert pipeline.canvas_size(_cfg(root)) is None


def test_moco_trains_on_a_canvas(tmp_path, monkeypatch):
  """One MoCo step on photos shrunk into 64-px canvases, the views resized in the step."""
  root = _folder(tmp_path, per_class=8)
  (tmp_path / "images" / "test").symlink_to(tmp_path / "images" / "train")
  c = _host_crop_config(demo_moco.get_config("tiny"), root, num=2)
  c.data.crops, c.data.canvas_size = "canvas", 64
  c.train.total_steps = 1
  c.train.batch_size, c.model.bn_group_size = 16, 4
  c.checkpoint.async_save = False
  seen = step_spy.record_batches(monkeypatch, moco.MoCo)
  loop.train_and_evaluate(c, str(tmp_path / "moco"))
  assert seen and all(s == (np.uint8, (c.train.batch_size // 8, 64, 64, 3)) for s in seen), seen
  records = common.read_metrics(str(tmp_path / "moco"))
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 1 and np.isfinite(losses[0])
  c.data.canvas_size = 8
  with pytest.raises(ValueError, match="canvas_size"):
    moco.MoCo(c).validate(8)
  c.data.canvas_size = 64
  c.nda.source = "image"
  with pytest.raises(ValueError, match="crops='canvas' cuts from the original photo"):
    moco.MoCo(c).validate(8)
