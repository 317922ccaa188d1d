"""Video sources: UCF-101 / HMDB-51 frame folders with official split files, moving digits."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from nda_jax.augment import positive
from nda_jax.data import digits
from nda_jax.data import image_folder
from nda_jax.data import pipeline
from nda_jax.data import sources
from nda_jax.data import video_frames

T, STRIDE, SIZE = 4, 3, 8          # clips of 4 frames 3 apart: a span of 10 frames
SPAN = (T - 1) * STRIDE + 1

# Frame folders (relative path -> number of frames). Every frame is a solid
# 16x12 colour: R = 10 * frame + 5, G = 30 * video + 15, B = 80 * class + 40.
UCF_VIDEOS = {
    "Alpha/v_Alpha_g01_c01": 20,
    "Alpha/v_Alpha_g02_c01": 17,
    "Beta/v_Beta_g01_c01": 24,
    "Beta/v_Beta_g02_c01": 9,      # shorter than one clip
    "Gamma/v_Gamma_g01_c01": 10,   # exactly one clip
    "Gamma/v_Gamma_g02_c01": 13,
}
UCF_CLASSES = ("Alpha", "Beta", "Gamma")
# Official formats: CRLF lines, "<class>/<video>.avi <id>" / "<class>/<video>.avi".
UCF_LISTS = {
    "trainlist01.txt": ["Alpha/v_Alpha_g01_c01.avi 1", "Beta/v_Beta_g01_c01.avi 2",
                        "Beta/v_Beta_g02_c01.avi 2", "Gamma/v_Gamma_g03_c01.avi 3",
                        "Gamma/v_Gamma_g01_c01.avi 3"],
    "testlist01.txt": ["Alpha/v_Alpha_g02_c01.avi", "Gamma/v_Gamma_g02_c01.avi"],
    "trainlist02.txt": ["Alpha/v_Alpha_g02_c01.avi 1", "Gamma/v_Gamma_g02_c01.avi 3"],
    "testlist02.txt": ["Alpha/v_Alpha_g01_c01.avi", "Beta/v_Beta_g01_c01.avi",
                       "Gamma/v_Gamma_g01_c01.avi"],
}
HMDB_VIDEOS = {
    "cartwheel/Bodenturnen_cartwheel_f_cm_np1_le_med_0": 15,
    "cartwheel/Cartwheel_cartwheel_f_cm_np1_ri_med_1": 21,
    "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0": 18,
    "brush_hair/Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0": 12,
    "chew/#20_Rhythm_chew_h_nm_np1_fr_goo_0": 11,
}
# "<video>.avi <type> " (trailing space as in the official files); 1 train, 2 test, 0 unused.
HMDB_SPLIT1 = {
    "brush_hair": [("April_09_brush_hair_u_nm_np1_ba_goo_0", 1),
                   ("Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0", 2)],
    "cartwheel": [("Bodenturnen_cartwheel_f_cm_np1_le_med_0", 0),
                  ("Cartwheel_cartwheel_f_cm_np1_ri_med_1", 1)],
    "chew": [("#20_Rhythm_chew_h_nm_np1_fr_goo_0", 2)],
}


def _write_frames(root, videos, classes):
  for k, (name, n) in enumerate(videos.items()):
    folder = root / name
    folder.mkdir(parents=True)
    cls = classes.index(name.split("/")[0])
    for f in range(n):
      Image.new("RGB", (16, 12), (10 * f + 5, 30 * k + 15, 80 * cls + 40)).save(
          folder / f"image_{f + 1:05d}.jpg", quality=95)


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
  base = tmp_path_factory.mktemp("ucf101")
  _write_frames(base / "frames", UCF_VIDEOS, UCF_CLASSES)
  splits = base / "splits"            # the default place: next to the frame folder
  splits.mkdir()
  lines = [f"{i + 1} {c}" for i, c in enumerate(UCF_CLASSES)]
  (splits / "classInd.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
  for file, lines in UCF_LISTS.items():
    (splits / file).write_bytes(("\r\n".join(lines) + "\r\n").encode())
  return base


@pytest.fixture(scope="module")
def hmdb(tmp_path_factory):
  base = tmp_path_factory.mktemp("hmdb51")
  classes = sorted(HMDB_SPLIT1)
  _write_frames(base / "frames", HMDB_VIDEOS, classes)
  splits = base / "testTrainMulti_7030_splits"
  splits.mkdir()
  for cls, rows in HMDB_SPLIT1.items():
    (splits / f"{cls}_test_split1.txt").write_text("".join(f"{v}.avi {t} \n" for v, t in rows))
  return base


def _cfg(name, base, **kw):
  return ml_collections.ConfigDict({"name": name, "data_dir": str(base / "frames"),
                                    "num_frames": T, "frame_stride": STRIDE,
                                    "image_size": SIZE, **kw})


def _decode_codes(clip):
  """(frame indices [T], video code, class) read back from a decoded clip's colours."""
  assert clip.shape == (T, SIZE, SIZE, 3) and clip.dtype == np.uint8
  mean = clip.reshape(T, -1, 3).astype(float).mean(1)
  assert np.abs(clip.reshape(T, -1, 3) - mean[:, None]).max() <= 3  # solid colour kept
  frames = np.round((mean[:, 0] - 5) / 10).astype(int)
  videos = np.round((mean[:, 1] - 15) / 30).astype(int)
  classes = np.round((mean[:, 2] - 40) / 80).astype(int)
  assert len(set(videos)) == 1 and len(set(classes)) == 1
  return frames, videos[0], classes[0]


def _video_code(name, videos=UCF_VIDEOS):
  return list(videos).index(name)


# ---------------------------------------------------------------- membership


@pytest.mark.parametrize("split_number,split,want", [
    (1, "train", ["Alpha/v_Alpha_g01_c01", "Beta/v_Beta_g01_c01", "Gamma/v_Gamma_g01_c01"]),
    (1, "test", ["Alpha/v_Alpha_g02_c01", "Gamma/v_Gamma_g02_c01"]),
    (2, "train", ["Alpha/v_Alpha_g02_c01", "Gamma/v_Gamma_g02_c01"]),
    (2, "test:random", ["Alpha/v_Alpha_g01_c01", "Beta/v_Beta_g01_c01",
                        "Gamma/v_Gamma_g01_c01"]),
])
def test_ucf101_membership_and_labels(ucf, caplog, split_number, split, want):
  source = sources.make_source(_cfg("ucf101", ucf, split_number=split_number), split)
  assert [v.name for v in source.videos] == want
  assert [v.num_frames for v in source.videos] == [UCF_VIDEOS[n] for n in want]
  assert source.num_classes == 3 and source.classes == UCF_CLASSES
  assert source.element_shape == (T, SIZE, SIZE, 3)
  one_per_video = video_frames.parse_split(split)[1] == "random"
  assert (len(source) == len(want)) == one_per_video
  for i in range(len(source)):
    example = source[i]
    frames, code, cls = _decode_codes(example["image"])
    name = source.videos[example["video"]].name
    assert code == _video_code(name) and (example["video"] == i or not one_per_video)
    assert example["label"] == cls == UCF_CLASSES.index(name.split("/")[0])
    assert example["label"].dtype == np.int32
    np.testing.assert_array_equal(frames, source.frame_indices(i))
  if split == "train" and split_number == 1:   # the short and the missing video
    assert "skipped 1 without a frame folder" in caplog.text
    assert "1 with fewer than the 10 frames" in caplog.text


def test_hmdb51_membership_and_labels(hmdb):
  cfg = _cfg("hmdb51", hmdb, splits_dir=str(hmdb / "testTrainMulti_7030_splits"))
  classes = sorted(HMDB_SPLIT1)
  for split, kind in (("train", 1), ("test", 2)):
    source = sources.make_source(cfg, split)
    want = [f"{c}/{v}" for c in classes for v, t in HMDB_SPLIT1[c] if t == kind]
    assert [v.name for v in source.videos] == want
    assert [v.label for v in source.videos] == [classes.index(n.split("/")[0]) for n in want]
    assert source.num_classes == 3 and list(source.classes) == classes
    for i in range(len(source)):
      example = source[i]
      frames, code, cls = _decode_codes(example["image"])
      name = source.videos[example["video"]].name
      assert code == _video_code(name, HMDB_VIDEOS) and cls == example["label"]
      np.testing.assert_array_equal(frames, source.frame_indices(i))


# ---------------------------------------------------------------- clip sampling


def test_random_clips_stride_range_and_determinism(ucf):
  cfg = _cfg("ucf101", ucf, clips_per_video=3, clip_seed=7)
  source = sources.make_source(cfg, "train")
  assert len(source) == 3 * len(source.videos)
  starts = {}
  for i in range(len(source)):
    frames = source.frame_indices(i)
    n = source.videos[i // 3].num_frames
    assert source[i]["video"] == i // 3
    np.testing.assert_array_equal(np.diff(frames), STRIDE)
    assert 0 <= frames[0] and frames[-1] <= n - 1
    starts[i] = frames[0]
  assert len({starts[i] for i in range(3)}) > 1   # a video's examples differ (20 frames)
  again = sources.make_source(cfg, "train")
  assert {i: again.frame_indices(i)[0] for i in range(len(again))} == starts
  cfg.clip_seed = 8
  other = sources.make_source(cfg, "train")
  assert {i: other.frame_indices(i)[0] for i in range(len(other))} != starts
  # Every start of a 20-frame video is drawn, nothing outside [0, 20 - SPAN].
  drawn = {video_frames.random_start(20, T, STRIDE, 0, i) for i in range(2000)}
  assert drawn == set(range(20 - SPAN + 1))


def test_dense_clips_half_overlap_and_cover_each_video(ucf):
  for split in ("test", "train:dense"):
    source = sources.make_source(_cfg("ucf101", ucf), split)
    per_video = {}
    for i in range(len(source)):
      example = source[i]
      frames, code, _ = _decode_codes(example["image"])
      np.testing.assert_array_equal(frames, source.frame_indices(i))
      np.testing.assert_array_equal(np.diff(frames), STRIDE)
      per_video.setdefault(int(example["video"]), []).append(frames)
      assert code == _video_code(source.videos[example["video"]].name)
    assert sorted(per_video) == list(range(len(source.videos)))
    for v, clips in per_video.items():
      n = source.videos[v].num_frames
      first = [c[0] for c in clips]
      assert first[0] == 0 and clips[-1][-1] == n - 1 and first == sorted(set(first))
      covered = set().union(*(range(c[0], c[-1] + 1) for c in clips))
      assert covered == set(range(n))
      step = (T // 2) * STRIDE
      regular = list(range(0, n - SPAN + 1, step))
      assert first[:len(regular)] == regular   # these share half their frames:
      for a, b in zip(clips[:len(regular)], clips[1:len(regular)]):
        assert len(set(a) & set(b)) == T // 2
      # At most one more clip, ending on the last frame, closer than `step`.
      assert len(first) - len(regular) == int(regular[-1] != n - SPAN)
      assert np.diff(first).max(initial=0) <= step


def test_count_frames_stops_at_a_gap(tmp_path):
  for f in (1, 2, 3, 5, 6):
    (tmp_path / f"image_{f:05d}.jpg").write_bytes(b"")
  (tmp_path / "image_4.jpg").write_bytes(b"")      # not the %05d name
  (tmp_path / "flow_00004.jpg").write_bytes(b"")
  assert video_frames.count_frames(str(tmp_path)) == 3
  assert video_frames.count_frames(str(tmp_path / "none")) is None


# ---------------------------------------------------------------- errors


def test_errors_name_the_path_and_the_layout(ucf, hmdb, tmp_path):
  missing = tmp_path / "nowhere"
  layout = "image_00001.jpg.*UCF101TrainTestSplits-RecognitionTask.zip"
  with pytest.raises(FileNotFoundError, match=f"{missing}.*{layout}"):
    sources.make_source(ml_collections.ConfigDict(dict(
        name="ucf101", data_dir=str(missing), num_frames=T, image_size=SIZE)), "train")
  with pytest.raises(FileNotFoundError, match="trainlist03.txt.*does not exist.*image_00001"):
    sources.make_source(_cfg("ucf101", ucf, split_number=3), "train")
  with pytest.raises(FileNotFoundError, match="classInd.txt.*ucf101.*crcv"):
    sources.make_source(_cfg("ucf101", ucf, splits_dir=str(tmp_path)), "test")
  with pytest.raises(FileNotFoundError, match=r"_test_split1.txt.*test_train_splits.rar"):
    sources.make_source(_cfg("hmdb51", hmdb), "train")   # default splits dir: absent
  # Split files fine, but every listed video is missing or too short.
  with pytest.raises(ValueError, match="No usable video.*of 5 listed, 1 without a frame "
                     "folder.*4 with fewer than the 61 frames.*image_00001.*crcv"):
    sources.make_source(_cfg("ucf101", ucf, frame_stride=20), "train")
  bad = tmp_path / "splits"
  bad.mkdir()
  (bad / "classInd.txt").write_text("1 Alpha\n2 Beta\n")
  (bad / "testlist01.txt").write_text("Gamma/v_Gamma_g02_c01.avi\n")
  with pytest.raises(ValueError, match="testlist01.txt: line 'Gamma/v_Gamma_g02_c01.avi'"):
    sources.make_source(_cfg("ucf101", ucf, splits_dir=str(bad)), "test")
  for kw, split, match in ((dict(split_number=4), "train", "split_number=4"),
                           ({}, "val", "set --config.data.val_fraction"),
                           ({}, "dev", "'train', 'val', 'test'"),
                           ({}, "test:all", "'random', 'dense'"),
                           (dict(frame_stride=0), "train", "frame_stride")):
    with pytest.raises(ValueError, match=match):
      sources.make_source(_cfg("ucf101", ucf, **kw), split)
  with pytest.raises(ValueError, match="num_frames"):
    sources.make_source(ml_collections.ConfigDict(dict(
        name="hmdb51", data_dir=str(hmdb), image_size=SIZE)), "train")


# ---------------------------------------------------------------- pipeline


def test_pipeline_batches(ucf):
  cfg = _cfg("ucf101", ucf, clips_per_video=4, train_split="train")
  it = pipeline.make_train_iterator(cfg, 4, 0, process_index=0, process_count=1)
  labels = []
  for _ in range(3):   # 12 examples: one epoch, each video 4 times
    batch = next(it)
    assert batch["image"].shape == (4, T, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    for clip, label in zip(batch["image"], batch["label"]):
      assert _decode_codes(clip)[2] == label
    labels += list(batch["label"])
  assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
  assert it.element_shape == (T, SIZE, SIZE, 3) and it.num_classes == 3
  source = sources.make_source(cfg, "test")
  data = pipeline.make_eval_iterator(cfg, "test", 2, process_index=0, process_count=1)
  images = np.concatenate([b["image"][b["mask"]] for b in data])
  np.testing.assert_array_equal(images, np.stack([source[i]["image"] for i in range(len(source))]))


def test_frame_width_keeps_the_whole_frame(ucf):
  """DPC's frames are 320x240 and its crops are drawn from all of it: image_size x frame_width
  = the frames' own 12 x 16 decodes each frame whole, without a resize (the file's pixels)."""
  cfg = _cfg("ucf101", ucf, image_size=12, frame_width=16)
  source = sources.make_source(cfg, "test")
  assert source.element_shape == (T, 12, 16, 3)
  example = source[0]
  folder = ucf / "frames" / source.videos[source.video_index(0)].name
  want = np.stack([np.asarray(Image.open(video_frames.frame_path(str(folder), int(f))).convert("RGB"))
                   for f in source.frame_indices(0)])
  np.testing.assert_array_equal(example["image"], want)
  assert "frame_width=16" in repr(source) and "frame_width" not in repr(
      sources.make_source(_cfg("ucf101", ucf), "test"))   # a square source reads as before


@pytest.mark.parametrize("size, want_resize, want_box", [
    ((20, 12), None, (2, 0, 18, 12)),           # wider: the central 16 columns, no resize
    ((16, 12), None, (0, 0, 16, 12)),           # the frame itself
    ((12, 16), (16, 21), (0, 4, 16, 16)),       # portrait: width to 16 (height 21.3 -> 21), central 12 rows
    ((32, 24), (16, 12), (0, 0, 16, 12)),       # larger: shorter side to 12 (resize_size)
])
def test_center_crop_resize_to_a_frame_shape(size, want_resize, want_box):
  """The whole frame where it fits: shorter side to resize_size (or more, for the width),
  then the central image_size x width; the same PIL calls written out by hand."""
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  got = image_folder.center_crop_resize(image, 12, 12, width=16)
  want = image if want_resize is None else image.resize(want_resize, Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(got, np.asarray(want.crop(want_box)))
  assert got.shape == (12, 16, 3)


def test_dpc_crops_are_drawn_from_the_whole_width():
  """DPC's RandomCrop(224) of a 320x240 frame: the crop's left edge is uniform on 0..96, so
  every column is seen (a centre 240x240 host crop made 0..16 of the middle only)."""
  ramp = np.broadcast_to(np.arange(320, dtype=np.float32)[None, None, None, :, None],
                         (256, 1, 240, 320, 3))
  keys = jax.random.split(jax.random.PRNGKey(0), 256)
  views = positive.dpc_aug_video(keys, jnp.asarray(ramp / 319 * 2 - 1), 224, crop_size=224,
                                 jitter=(0.0, 0.0, 0.0, 0.0), p_gray=0.0, p_flip=0.0)
  left = np.round((np.asarray(views[:, 0, 0, 0, 0]) + 1) / 2 * 319).astype(int)
  assert left.min() >= 0 and left.max() <= 96
  # Uniform on the 97 offsets: each third of the range holds 1/3 of 256 draws (binomial
  # sd 7.5; 4 sd bound), and both ends are reached.
  counts = np.histogram(left, bins=[0, 33, 65, 97])[0]
  assert np.all(np.abs(counts - 256 / 3) < 4 * 7.5), counts
  assert left.min() <= 4 and left.max() >= 92


# ---------------------------------------------------------------- moving digits


def _centre_of_mass(frames):
  """(y, x) ink centre [N, 2] of gray frames [N, H, W]."""
  ys, xs = np.mgrid[:frames.shape[1], :frames.shape[2]]
  ink = frames.astype(float).sum((1, 2))
  return np.stack([(frames * ys).sum((1, 2)) / ink, (frames * xs).sum((1, 2)) / ink], -1)


@pytest.mark.parametrize("num_frames", [6, 5])
def test_moving_digit_directions_match_the_motion(num_frames):
  clips, _ = digits.load_moving_digits("test", num_frames=num_frames)
  directions = digits.load_moving_digit_directions("test", num_frames=num_frames)
  gray = clips[..., 0]
  first, last, before = (_centre_of_mass(gray[:, t]) for t in (0, -1, -2))
  moved = np.round(last - first, 6)
  tie = moved == 0
  moved = np.where(tie, np.round(before - first, 6), moved)
  assert (moved != 0).all()
  assert tie.any() == (num_frames % 2 == 1)   # odd steps never return the digit home
  names = [digits.DIRECTIONS[d] for d in directions]
  np.testing.assert_array_equal(["down" in n for n in names], moved[:, 0] > 0)
  np.testing.assert_array_equal(["right" in n for n in names], moved[:, 1] > 0)
  assert set(directions) == set(range(len(digits.DIRECTIONS)))


def test_moving_digits_source_labels():
  base = dict(name="moving_digits", num_frames=6, image_size=32, digit_size=16)
  by_digit = sources.make_source(ml_collections.ConfigDict(base), "test")
  by_motion = sources.make_source(ml_collections.ConfigDict(dict(base, label_key="direction")),
                                  "test")
  clips, digit_labels = digits.load_moving_digits("test", num_frames=6)
  directions = digits.load_moving_digit_directions("test", num_frames=6)
  assert by_digit.num_classes == 10 and by_motion.num_classes == 4
  for i in (0, 5, 299):
    for source, label in ((by_digit, digit_labels[i]), (by_motion, directions[i])):
      example = source[i]
      np.testing.assert_array_equal(example["image"], clips[i])
      assert example["label"] == label and example["label"].dtype == np.int32
      assert example["digit"] == digit_labels[i] and example["direction"] == directions[i]
  single = sources.make_source(ml_collections.ConfigDict(dict(base, num_frames=1)), "test")
  assert "direction" not in single[0] and single[0]["image"].shape == (1, 32, 32, 3)
  with pytest.raises(ValueError, match="num_frames >= 2"):
    sources.make_source(ml_collections.ConfigDict(
        dict(base, num_frames=1, label_key="direction")), "test")
  with pytest.raises(ValueError, match="'digit', 'direction'"):
    sources.make_source(ml_collections.ConfigDict(dict(base, label_key="speed")), "test")
