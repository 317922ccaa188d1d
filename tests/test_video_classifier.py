"""Video classification: video-level averaging, video ids through the eval pipeline, the
held-out validation list, and the DPC classifier (lr groups in fine-tuning, frozen probe)."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import demo_video
from configs import demo_video_probe
from nda_jax import logs
from nda_jax import parallel
from nda_jax import trainers
from nda_jax.data import pipeline
from nda_jax.data import sources
from nda_jax.data import video_frames
from nda_jax.evaluators import video_classification as vc_eval
from nda_jax.importers import save
from nda_jax.trainers import loop
from nda_jax.trainers import video_classifier as vc

T, SIZE = 4, 8          # clips of 4 consecutive frames: dense clips start every 2 frames
CLASSES = ("Alpha", "Beta")
# Training list: groups of 1-2 clips per class. Test list order (9, 12, 4, 7 frames:
# 4, 5, 1, 3 dense clips) puts the clips of the second video in two batches of 8.
TRAIN = {"Alpha/v_Alpha_g01_c01": 6, "Alpha/v_Alpha_g01_c02": 5, "Alpha/v_Alpha_g02_c01": 6,
         "Alpha/v_Alpha_g03_c01": 7, "Alpha/v_Alpha_g04_c01": 5, "Alpha/v_Alpha_g05_c01": 6,
         "Beta/v_Beta_g01_c01": 6, "Beta/v_Beta_g02_c01": 5, "Beta/v_Beta_g02_c02": 6,
         "Beta/v_Beta_g03_c01": 8}
TEST = {"Alpha/v_Alpha_g06_c01": 9, "Beta/v_Beta_g04_c01": 12, "Alpha/v_Alpha_g07_c01": 4,
        "Beta/v_Beta_g05_c01": 7}


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
  """A UCF-101 layout; frame f of video k is a solid (10 f + 5, 20 k + 15, 100 class + 40)."""
  base = tmp_path_factory.mktemp("ucf101")
  for k, (name, n) in enumerate({**TRAIN, **TEST}.items()):
    folder = base / "frames" / name
    folder.mkdir(parents=True)
    cls = CLASSES.index(name.split("/")[0])
    for f in range(n):
      Image.new("RGB", (16, 12), (10 * f + 5, 20 * k + 15, 100 * cls + 40)).save(
          folder / f"image_{f + 1:05d}.jpg", quality=95)
  splits = base / "splits"
  splits.mkdir()
  (splits / "classInd.txt").write_text("1 Alpha\n2 Beta\n")
  (splits / "trainlist01.txt").write_text(
      "".join(f"{n}.avi {CLASSES.index(n.split('/')[0]) + 1}\n" for n in TRAIN))
  (splits / "testlist01.txt").write_text("".join(f"{n}.avi\n" for n in TEST))
  return base


def _cfg(base, **kw):
  return ml_collections.ConfigDict({"name": "ucf101", "data_dir": str(base / "frames"),
                                    "num_frames": T, "image_size": SIZE, **kw})


# ---------------------------------------------------------------- video-level averaging


def _reference(logits, labels, videos):
  """(clip top-1, video top-1) from the definition: mean softmax over each video's clips."""
  clip = np.mean([np.argmax(row) == y for row, y in zip(logits, labels)])
  correct = []
  for v in sorted(set(videos)):
    rows = [i for i in range(len(videos)) if videos[i] == v]
    probs = [[math.exp(z) / sum(math.exp(t) for t in logits[i]) for z in logits[i]]
             for i in rows]
    mean = [sum(p[c] for p in probs) / len(rows) for c in range(len(logits[0]))]
    correct.append(int(np.argmax(mean)) == labels[rows[0]])
  return clip, np.mean(correct)


def test_video_accuracy_matches_the_definition():
  rng = np.random.default_rng(0)
  counts, num_classes = [3, 1, 4, 2, 5, 3], 5
  videos = np.repeat(np.arange(len(counts)) * 3 + 2, counts)   # ids need not be contiguous
  labels = np.repeat(rng.integers(num_classes, size=len(counts)), counts)
  logits = rng.normal(size=(len(videos), num_classes)) * 2 + 1.5 * np.eye(num_classes)[labels]
  acc = vc_eval.VideoAccuracy(num_classes)
  for start in range(0, len(videos), 4):       # batches of 4 real clips + 2 padding rows
    stop = min(start + 4, len(videos))
    pad = 6 - (stop - start)
    acc.add(np.concatenate([logits[start:stop], rng.normal(size=(pad, num_classes)) * 9]),
            np.concatenate([labels[start:stop], np.full(pad, 4)]),
            np.concatenate([videos[start:stop], np.zeros(pad, int)]),
            np.arange(6) < stop - start)
  clip, video, num_videos = acc.result()
  want_clip, want_video = _reference(logits, labels, videos)
  assert (clip, video, num_videos) == (want_clip, want_video, len(counts))
  assert 0 < want_clip < 1 and want_clip != want_video


def test_video_accuracy_averages_probabilities_not_logits_or_votes():
  # Mean softmax says class 1; mean logits say class 0 ([3.3, 1.3]); so would one confident clip.
  acc = vc_eval.VideoAccuracy(2)
  acc.add(np.array([[10.0, 0.0], [0.0, 2.0], [0.0, 2.0]]), np.ones(3, int), np.zeros(3, int),
          np.ones(3, bool))
  assert acc.result() == (2 / 3, 1.0, 1)
  with pytest.raises(ValueError, match="different labels"):
    acc.add(np.zeros((1, 2)), np.zeros(1, int), np.zeros(1, int), np.ones(1, bool))
  with pytest.raises(ValueError, match="shape"):
    acc.add(np.zeros((2, 3)), np.zeros(2, int), np.zeros(2, int), np.ones(2, bool))


def test_evaluator_on_dense_clips_of_videos(ucf):
  """Batches of 8 (the mesh) over 13 dense test clips: a video across batches, padding."""
  source = sources.make_source(_cfg(ucf), "test")
  assert len(source) == 13 and [source.video_index(i) for i in (3, 4, 8, 9)] == [0, 1, 1, 2]

  def logits_of(clips):   # a fixed function of the pixels, right on some clips only
    x = np.asarray(clips, np.float64).reshape(len(clips), -1, 3).mean(1)
    return np.stack([np.sin(x[:, 0] / 7), np.cos(x[:, 0] / 11 + x[:, 1] / 5)], -1)

  examples = [source[i] for i in range(len(source))]
  logits = logits_of(np.stack([e["image"] for e in examples]))
  labels = [int(e["label"]) for e in examples]
  videos = [int(e["video"]) for e in examples]
  calls = []

  def classify_fn(clips):
    calls.append(len(clips))
    return logits_of(clips)

  cfg = vc_eval.VideoClassificationEvaluator.default_config()
  cfg.batch_size = 5        # rounded up to the 8 devices
  data_cfg = _cfg(ucf, eval_split="test")
  evaluator = vc_eval.VideoClassificationEvaluator(cfg, data_cfg, workdir=None,
                                                   mesh=parallel.default_mesh())
  got = dict(evaluator.run(classify_fn))
  want_clip, want_video = _reference(logits, labels, videos)
  assert got == {"test_clip_top1": want_clip, "test_video_top1": want_video}
  assert calls == [8, 8] and 0 < want_clip < 1 and want_clip != want_video
  # A subset of whole videos, at most 6 clips.
  cfg.max_examples = 6
  chosen = vc_eval.video_subset(np.array(videos), 6, 0)
  kept = np.isin(videos, np.array(videos)[chosen])
  np.testing.assert_array_equal(np.flatnonzero(kept), chosen)
  assert 1 < len(set(np.array(videos)[chosen])) < 4 and len(chosen) <= 6
  evaluator = vc_eval.VideoClassificationEvaluator(cfg, data_cfg, workdir=None,
                                                   mesh=parallel.default_mesh())
  want_clip, want_video = _reference(logits[chosen], [labels[i] for i in chosen],
                                     [videos[i] for i in chosen])
  assert dict(evaluator.run(classify_fn)) == {"test_clip_top1": want_clip,
                                               "test_video_top1": want_video}


# ---------------------------------------------------------------- the eval pipeline


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_carry_video_ids(ucf, process_count):
  cfg = _cfg(ucf)
  source = sources.make_source(cfg, "test")
  seen = {"image": [], "label": [], "video": []}
  for p in range(process_count):
    data = pipeline.make_eval_iterator(cfg, "test", 6, process_index=p,
                                       process_count=process_count)
    for batch in data:
      assert batch["video"].dtype == np.int32 and batch["video"].shape == batch["mask"].shape
      pad = ~batch["mask"]
      assert not batch["video"][pad].any() and not batch["label"][pad].any()
      assert not batch["image"][pad].any()
      for key in seen:
        seen[key].append(batch[key][batch["mask"]])
  np.testing.assert_array_equal(np.concatenate(seen["video"]),
                                [source.video_index(i) for i in range(len(source))])
  np.testing.assert_array_equal(np.concatenate(seen["image"]),
                                np.stack([source[i]["image"] for i in range(len(source))]))
  # Only the examples asked for, in order, counted as the split's size.
  data = pipeline.make_eval_iterator(cfg, "test", 4, process_index=0, process_count=1,
                                     examples=np.array([1, 4, 5, 12]))
  batches = list(data)
  assert data.num_examples == 4 and len(batches) == 1
  np.testing.assert_array_equal(batches[0]["video"], [0, 1, 1, 3])
  with pytest.raises(ValueError, match="increasing indices"):
    pipeline.make_eval_iterator(cfg, "test", 4, process_index=0, process_count=1,
                                examples=np.array([4, 1]))


def test_eval_batches_carry_every_int_key_of_moving_digits():
  cfg = ml_collections.ConfigDict({"name": "moving_digits", "num_frames": 3, "image_size": 16,
                                   "digit_size": 8, "label_key": "direction"})
  source = sources.make_source(cfg, "test")
  data = pipeline.make_eval_iterator(cfg, "test", 128, process_index=0, process_count=1)
  batches = list(data)
  last = batches[-1]
  assert set(last) == {"image", "label", "digit", "direction", "mask"} and not last["mask"][-1]
  assert not last["digit"][~last["mask"]].any()
  digit = np.concatenate([b["digit"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(digit, [source[i]["digit"] for i in range(len(source))])
  np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                np.concatenate([b["direction"][b["mask"]] for b in batches]))


# ---------------------------------------------------------------- the validation list


def test_val_holds_out_whole_groups_of_the_train_list(ucf):
  full = sources.make_source(_cfg(ucf), "train")
  train = sources.make_source(_cfg(ucf, val_fraction=0.25), "train")
  val = sources.make_source(_cfg(ucf, val_fraction=0.25), "val")
  names = lambda s: [v.name for v in s.videos]
  assert names(full) == list(TRAIN)
  assert sorted(names(train) + names(val)) == sorted(TRAIN) and not set(names(train)) & set(
      names(val))
  group = lambda n: video_frames.video_group("ucf101", n)
  assert not {group(n) for n in names(train)} & {group(n) for n in names(val)}
  # round(0.25 x groups) per class: 1 of Alpha's 5 groups, 1 of Beta's 3.
  for cls, want in (("Alpha", 1), ("Beta", 1)):
    assert len({group(n) for n in names(val) if n.startswith(cls)}) == want
  assert [v.label for v in val.videos] == [CLASSES.index(n.split("/")[0]) for n in names(val)]
  assert val.video_index(len(val) - 1) == len(val.videos) - 1 and val.element_shape == (
      T, SIZE, SIZE, 3)
  assert video_frames.parse_split("val") == ("val", "dense")
  assert video_frames.video_group("hmdb51", "chew/x_g01_c02") == "chew/x_g01_c02"   # a video
  # Deterministic, and a larger fraction holds out more, never a whole class.
  assert names(sources.make_source(_cfg(ucf, val_fraction=0.25), "val")) == names(val)
  most = sources.make_source(_cfg(ucf, val_fraction=0.9), "val")
  assert len({group(n) for n in names(most)}) == 4 + 2
  assert "val_fraction=0.25" in repr(val) and "val_fraction" not in repr(full)
  with pytest.raises(ValueError, match="val_fraction"):
    sources.make_source(_cfg(ucf), "val")
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    sources.make_source(_cfg(ucf, val_fraction=1.0), "train")


# ---------------------------------------------------------------- the classifier


@pytest.fixture(scope="module")
def dpc_run(tmp_path_factory):
  """(workdir, state) of a DPC run of demo_video.py:tiny with random weights, written by
  save_imported: the tree of DPC's TrainState without compiling DPC."""
  workdir = tmp_path_factory.mktemp("dpc")
  config = demo_video.get_config("tiny")
  method = trainers.get_method(config)
  shapes = jax.eval_shape(method.init_state, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.zeros(leaf.shape, leaf.dtype)
    if names[-1] == "var":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif leaf.ndim >= 2:
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = (names[-1] == "scale") + 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  state = jax.tree_util.tree_map_with_path(fill, shapes)
  save.save_imported(str(workdir), config, state)
  return str(workdir), state


def _probe_config(variants, pretrained):
  config = demo_video_probe.get_config(variants)
  config.pretrained_workdir = pretrained
  return config


def test_finetune_moves_encoder_and_convgru_at_a_tenth_of_the_head_lr(dpc_run):
  """One Adam step from zero moments moves every parameter by lr x mult x |g| / (|g| + eps):
  lr x mult wherever |g| >> eps, never more."""
  config = _probe_config("tiny,finetune", dpc_run[0])
  config.optim.lr = 0.05
  method = vc.VideoClassifier(config, 1497)
  method.validate(8)
  state = method.init_state(jax.random.PRNGKey(0))
  assert set(state.params) == {"encoder", "agg", "head"}
  dp = parallel.DataParallel()
  data = pipeline.make_train_iterator(config.data, 16, 0)
  try:
    batch = dp.shard_batch(method.step_batch(next(data)))
  finally:
    data.close()
  before = jax.device_get(state)
  after, metrics = dp.step(method.make_step())(dp.put_state(state), batch)
  after = jax.device_get(after)
  assert np.isfinite(float(metrics["loss"]))
  for key, mult in (("encoder", 0.1), ("agg", 0.1), ("head", 1.0)):
    moved = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
        jax.tree.leaves(after.params[key]), jax.tree.leaves(before.params[key]))]) / 0.05
    assert moved.max() <= mult * (1 + 1e-4), key
    np.testing.assert_allclose(np.median(moved), mult, rtol=1e-3, err_msg=key)
  # BN running averages of the encoder follow the fine-tuning batches.
  assert not np.array_equal(after.batch_stats["encoder"]["stem_bn"]["mean"],
                            before.batch_stats["encoder"]["stem_bn"]["mean"])


def test_linear_probe_trains_through_the_loop_on_a_frozen_dpc_encoder(dpc_run, tmp_path):
  pretrained, dpc_state = dpc_run
  workdir = str(tmp_path / "probe")
  config = _probe_config("tiny", pretrained)
  loop.train_and_evaluate(config, workdir)
  records = logs.read_metrics(workdir)
  evals = [r for r in records if "test_video_top1" in r]
  assert [r["step"] for r in evals] == [4]
  # A moving-digit clip is its own video: both accuracies are the same fraction of 32 clips.
  assert evals[0]["test_clip_top1"] == evals[0]["test_video_top1"]
  assert evals[0]["test_clip_top1"] * 32 == round(evals[0]["test_clip_top1"] * 32)
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  _, method, state = trainers.load_run(workdir)
  assert isinstance(method, vc.VideoClassifier) and int(state.step) == 4
  # The encoder and the ConvGRU are bit-identical to the DPC run's after 4 steps; the head moved.
  for key in ("encoder", "agg"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params[key]),
                 jax.device_get(dpc_state.params[key]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.batch_stats["encoder"]),
               jax.device_get(dpc_state.batch_stats["encoder"]))
  head_shapes = {leaf.shape for leaf in jax.tree.leaves(state.params["head"])}
  assert {leaf.shape for leaf in jax.tree.leaves(state.opt) if leaf.ndim} == head_shapes
  init_head = method.init_state(jax.random.PRNGKey(config.seed)).params["head"]
  assert not np.array_equal(state.params["head"]["fc"]["kernel"], init_head["fc"]["kernel"])


def test_config_errors_name_the_key(dpc_run):
  with pytest.raises(ValueError, match="pretrained_workdir is not set"):
    vc.VideoClassifier(_probe_config("tiny", None)).validate(8)
  wide = _probe_config("tiny", dpc_run[0])
  wide.model.width = 8
  with pytest.raises(ValueError, match=r"model.width=8 \(the run has 4\)"):
    vc.VideoClassifier(wide).validate(8)
  for key, value, match in (("mode", "last", "config.mode"),
                            ("data.num_frames", 6, "num_seq x model.seq_len"),
                            ("optim.lr_mults", {"backbone": 0.1}, "backbone")):
    config = _probe_config("tiny,finetune", "")
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=match):
      vc.VideoClassifier(config).validate(8)
  # Flipping clips whose label is their direction of motion gives half of them the wrong label.
  direction = _probe_config("tiny,direction", "")
  vc.VideoClassifier(direction).validate(8)
  direction.aug.p_flip = 0.5
  with pytest.raises(ValueError, match="moves the other way"):
    vc.VideoClassifier(direction).validate(8)
