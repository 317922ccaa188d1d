"""UCF-101 and HMDB-51 as folders of extracted frames, with the official splits.

Frames (what DPC's process_data/src/extract_frame.py writes):
  DATA_DIR/<class>/<video>/image_00001.jpg, image_00002.jpg, ...
one folder per video, named like its .avi without the extension, frames
numbered from 1 (frames after a gap in the numbering are ignored).
Split files, the unchanged official ones, in SPLITS_DIR (`splits_dir`;
default: a folder `splits` next to DATA_DIR, as the two archives unpack to
different folder names):
  UCF-101  classInd.txt ('1 ApplyEyeMakeup'), trainlist0K.txt
           ('ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1'), testlist0K.txt
           (path only). The label of both lists is the classInd id of the
           video's class folder (minus 1); names compare case-insensitively.
  HMDB-51  <class>_test_splitK.txt, lines '<video>.avi N', N = 1 train,
           2 test, 0 unused. Labels index the sorted class names.
K is `split_number` (1..3).

A clip is `num_frames` frames `frame_stride` apart (DPC: 8 blocks of 5 frames
at stride 3, i.e. num_frames=40, frame_stride=3), spanning
(num_frames - 1) * frame_stride + 1 frames. Listed videos without a frame
folder or shorter than one clip are skipped and counted in the log (DPC drops
short videos too; it asks for num_frames * frame_stride + 1 frames).

Split names are '<list>[:<sampling>]': list 'train', 'val' or 'test', sampling
  random  one clip per example at a uniformly drawn start (default for train);
  dense   the clips starting every (num_frames // 2) * frame_stride frames, so
          consecutive clips share half their frames, plus one ending on the
          last frame so that together they cover the video (default for test
          and val: the protocol averages the softmax over the clips of each
          video).
Every example carries 'video', its index into `source.videos`, for that
average (also `source.video_index(i)`, which decodes nothing).

Validation: `val_fraction` > 0 holds out part of the official TRAIN list as
list 'val' (for choosing checkpoints; DPC chose them on a sample of the test
list), and list 'train' is the rest. Whole groups are held out, per class: a
UCF-101 group (`v_<Class>_gXX_*`, clips of one actor and scene, which the
official splits never divide between train and test either), an HMDB-51
video. Each class with at least two groups gives round(val_fraction x its
groups) of them, at least one and never all, drawn with a fixed seed from the
list file alone (not from which frame folders exist), so the held-out videos
are the same on every machine. val_fraction = 0 (default) keeps the whole
train list and has no 'val'.

A random start is a function of (`clip_seed`, example index) alone: grain
hands a source the record index without the epoch, and a start drawn this
way does not depend on sharding, shuffling or resuming. So that training does
not see one fixed clip per video, `clips_per_video` K turns each video into K
examples with independent starts (an epoch of the source is K passes over
the videos; a large K comes close to DPC's fresh start at every visit).

Frames are decoded with PIL, the shorter side resized to `resize_size`
(default `image_size`) and center-cropped to `image_size` x `frame_width`
(default: a square of `image_size`), the same crop for every frame
(image_folder.decode); random crops, flips and colour jitter are on-device
augmentations. DPC's UCF-101 / HMDB-51 frames are 320x240 (shorter side 240),
and its RandomCrop(224) is drawn from the whole frame: the DPC configs keep it
(image_size 240, frame_width 320; the few wider HMDB-51 frames lose the columns
beyond the central 320, which DPC's crops could reach). Nothing is downloaded.
"""
import dataclasses
import os
import re

from absl import logging
import numpy as np

from nda_jax.data import image_folder

DATASETS = ("ucf101", "hmdb51")
LISTS = ("train", "val", "test")
SAMPLINGS = ("random", "dense")
SPLIT_NUMBERS = (1, 2, 3)
_DEFAULT_SAMPLING = {"train": "random", "val": "dense", "test": "dense"}
_HMDB_TYPE = {"train": "1", "test": "2"}
_FRAME = re.compile(r"image_(\d{5,})\.jpg")
_UCF_GROUP = re.compile(r"(.*_g\d+)_c\d+")
_VAL_SEED = 0


@dataclasses.dataclass(frozen=True)
class Video:
  """One listed video with its frames: `name` is '<class>/<video>', its folder in data_dir."""
  name: str
  label: int
  num_frames: int


def default_splits_dir(data_dir: str) -> str:
  return os.path.join(os.path.dirname(os.path.normpath(data_dir)), "splits")


def howto(dataset: str, data_dir: str, splits_dir: str, split_number: int) -> str:
  """The expected layout and where its parts come from, for error messages."""
  frames = (f"Expected the frames as {data_dir}/<class>/<video>/image_00001.jpg, "
            "image_00002.jpg, ... (one folder per video, named like its .avi without "
            "the extension, frames numbered from 1), as DPC's "
            "process_data/src/extract_frame.py writes them (OpenCV, shorter side 240); "
            "`ffmpeg -i <video>.avi -vf scale=-2:240 -q:v 2 <video>/image_%05d.jpg` "
            "does the same. ")
  if dataset == "ucf101":
    splits = (f"The official split files classInd.txt, trainlist{split_number:02d}.txt "
              f"and testlist{split_number:02d}.txt belong in {splits_dir}: they are in "
              "UCF101TrainTestSplits-RecognitionTask.zip from the UCF CRCV site "
              "(https://www.crcv.ucf.edu/data/UCF101.php). ")
  else:
    splits = (f"The official split files <class>_test_split{split_number}.txt (one per "
              f"class) belong in {splits_dir}: they are in test_train_splits.rar from "
              "the HMDB51 site (https://serre-lab.clps.brown.edu/resource/"
              "hmdb-a-large-human-motion-database/). ")
  return (frames + splits + "Set --config.data.data_dir (the frame folder) and "
          "--config.data.splits_dir (default: 'splits' next to data_dir); nothing is "
          "downloaded.")


def parse_split(split: str) -> tuple[str, str]:
  """'train' -> ('train', 'random'); 'test' / 'val' -> (.., 'dense'); 'test:random' ..."""
  which, _, sampling = split.partition(":")
  sampling = sampling or _DEFAULT_SAMPLING.get(which, "")
  if which not in LISTS or sampling not in SAMPLINGS:
    raise ValueError(f"Unknown video split {split!r}; use '<list>[:<sampling>]' with "
                     f"list in {LISTS} and sampling in {SAMPLINGS}.")
  return which, sampling


def _read_lines(path: str, layout: str) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Split file {path!r} does not exist. {layout}")
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def read_ucf101_list(splits_dir: str, split_number: int, which: str,
                     layout: str) -> tuple[list[tuple[str, int]], list[str]]:
  """([(frame folder '<class>/<video>', label)], class names) of an official list."""
  class_file = os.path.join(splits_dir, "classInd.txt")
  classes = []
  for line in _read_lines(class_file, layout):
    parts = line.split()
    if len(parts) != 2 or parts[0] != str(len(classes) + 1):
      raise ValueError(f"{class_file}: line {line!r} is not '<id> <class>' with ids "
                       f"1, 2, ... in order. {layout}")
    classes.append(parts[1])
  label_of = {name.lower(): i for i, name in enumerate(classes)}
  path = os.path.join(splits_dir, f"{which}list{split_number:02d}.txt")
  videos = []
  for line in _read_lines(path, layout):
    parts = line.split()
    label = label_of.get(parts[0].split("/")[0].lower())
    if (len(parts) > 2 or parts[0].count("/") != 1 or label is None
        or parts[1:] not in ([], [str(label + 1)])):
      raise ValueError(f"{path}: line {line!r} is not '<class>/<video>.avi[ <id>]' "
                       f"with the class and id of a line of {class_file}. {layout}")
    videos.append((os.path.splitext(parts[0])[0], label))
  return videos, classes


def read_hmdb51_list(splits_dir: str, split_number: int, which: str,
                     layout: str) -> tuple[list[tuple[str, int]], list[str]]:
  """([(frame folder '<class>/<video>', label)], class names) of an official list."""
  suffix = f"_test_split{split_number}.txt"
  files = []
  if os.path.isdir(splits_dir):
    files = sorted(f for f in os.listdir(splits_dir) if f.endswith(suffix))
  if not files:
    raise FileNotFoundError(f"No split files *{suffix} in {splits_dir!r}. {layout}")
  classes = [f[:-len(suffix)] for f in files]
  videos = []
  for label, (name, file_name) in enumerate(zip(classes, files)):
    path = os.path.join(splits_dir, file_name)
    for line in _read_lines(path, layout):
      parts = line.rsplit(None, 1)
      if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
        raise ValueError(f"{path}: line {line!r} is not '<video>.avi 0|1|2'. {layout}")
      if parts[1] == _HMDB_TYPE[which]:
        videos.append((f"{name}/{os.path.splitext(parts[0])[0]}", label))
  return videos, classes


_READERS = {"ucf101": read_ucf101_list, "hmdb51": read_hmdb51_list}


def count_frames(folder: str) -> int | None:
  """N where image_00001.jpg .. image_N.jpg all exist; None without the folder."""
  if not os.path.isdir(folder):
    return None
  numbers = {int(m.group(1)) for m in map(_FRAME.fullmatch, os.listdir(folder)) if m}
  count = 0
  while count + 1 in numbers:
    count += 1
  return count


def frame_path(folder: str, frame: int) -> str:
  """File of the 0-based `frame` of a video folder."""
  return os.path.join(folder, f"image_{frame + 1:05d}.jpg")


def _example(names: list[str]) -> str:
  return f" (e.g. {names[0]!r})" if names else ""


def video_group(dataset: str, name: str) -> str:
  """What a validation split holds out whole: a UCF-101 group ('<class>/v_<Class>_gXX'),
  an HMDB-51 video."""
  match = _UCF_GROUP.fullmatch(name) if dataset == "ucf101" else None
  return match.group(1) if match else name


def validation_groups(dataset: str, listed: list[tuple[str, int]],
                      val_fraction: float) -> set[str]:
  """The groups of a train list (`[(name, label)]`) held out for validation (see the top)."""
  by_class: dict[int, set[str]] = {}
  for name, label in listed:
    by_class.setdefault(label, set()).add(video_group(dataset, name))
  held = set()
  for label, groups in sorted(by_class.items()):
    if len(groups) < 2:
      continue
    count = min(max(round(val_fraction * len(groups)), 1), len(groups) - 1)
    order = np.random.default_rng([_VAL_SEED, label]).permutation(len(groups))
    held.update(np.array(sorted(groups))[order[:count]].tolist())
  return held


def list_videos(dataset: str, data_dir: str, splits_dir: str, split_number: int,
                which: str, min_frames: int,
                val_fraction: float = 0.0) -> tuple[list[Video], list[str]]:
  """The videos of a list ('train', 'val', 'test') with at least `min_frames` frames,
  and the classes."""
  layout = howto(dataset, data_dir, splits_dir, split_number)
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
  if which == "val" and not val_fraction:
    raise ValueError(f"Split 'val' is a held-out part of the {dataset} train list: set "
                     f"--config.data.val_fraction (e.g. 0.1) to make one.")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"{dataset} frame folder {data_dir!r} does not exist. {layout}")
  listed, classes = _READERS[dataset](splits_dir, split_number,
                                      "test" if which == "test" else "train", layout)
  if which != "test" and val_fraction:
    held = validation_groups(dataset, listed, val_fraction)
    listed = [(name, label) for name, label in listed
              if (video_group(dataset, name) in held) == (which == "val")]
  videos, missing, short = [], [], []
  for name, label in listed:
    n = count_frames(os.path.join(data_dir, name))
    if n is None:
      missing.append(name)
    elif n < min_frames:
      short.append(name)
    else:
      videos.append(Video(name, label, n))
  counts = (f"{len(missing)} without a frame folder{_example(missing)} and "
            f"{len(short)} with fewer than the {min_frames} frames of one clip"
            f"{_example(short)}")
  what = f"{dataset} {which} list of split {split_number}"
  if which != "test" and val_fraction:
    what += f" (val_fraction={val_fraction})"
  if not videos:
    raise ValueError(f"No usable video in the {what}: of {len(listed)} listed, "
                     f"{counts}. {layout}")
  if missing or short:
    logging.warning("%s: using %d of %d videos, skipped %s.", what, len(videos),
                    len(listed), counts)
  return videos, classes


def clip_span(num_frames: int, frame_stride: int) -> int:
  """Frames from the first to the last frame of a clip, both included."""
  return (num_frames - 1) * frame_stride + 1


def dense_starts(length: int, num_frames: int, frame_stride: int) -> np.ndarray:
  """First frames of the evaluation clips of a `length`-frame video (see the top)."""
  last = length - clip_span(num_frames, frame_stride)
  if last < 0:
    raise ValueError(f"A {length}-frame video holds no clip of {num_frames} frames "
                     f"{frame_stride} apart.")
  starts = np.arange(0, last + 1, max(num_frames // 2, 1) * frame_stride)
  return starts if starts[-1] == last else np.append(starts, last)


def random_start(length: int, num_frames: int, frame_stride: int, seed: int,
                 index: int) -> int:
  """A uniform clip start in a `length`-frame video, fixed by (seed, index)."""
  num_starts = length - clip_span(num_frames, frame_stride) + 1
  return int(np.random.default_rng([seed % 2**32, index]).integers(num_starts))


class VideoFramesSource:
  """Clips uint8 [T, image_size, frame_width, 3] of UCF-101 / HMDB-51 frame folders (see the top).

  Examples: {'image', 'label': int32 class, 'video': int32 index into `videos`}.
  """

  def __init__(self, dataset: str, data_dir: str, split: str, *, num_frames: int,
               image_size: int, frame_stride: int = 1, split_number: int = 1,
               splits_dir: str | None = None, resize_size: int | None = None,
               clips_per_video: int = 1, clip_seed: int = 0, val_fraction: float = 0.0,
               frame_width: int | None = None):
    if dataset not in DATASETS:
      raise ValueError(f"Unknown video dataset {dataset!r}; choose one of {DATASETS}.")
    if split_number not in SPLIT_NUMBERS:
      raise ValueError(f"{dataset} has official splits {SPLIT_NUMBERS}; got "
                       f"split_number={split_number!r}.")
    for key, value in (("num_frames", num_frames), ("frame_stride", frame_stride),
                       ("clips_per_video", clips_per_video), ("image_size", image_size),
                       ("frame_width", frame_width or image_size)):
      if value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}.")
    which, sampling = parse_split(split)
    videos, classes = list_videos(
        dataset, data_dir, splits_dir or default_splits_dir(data_dir), split_number,
        which, clip_span(num_frames, frame_stride), val_fraction)
    self.videos = tuple(videos)
    self.classes = tuple(classes)
    self.num_classes = len(classes)
    self._clip = (num_frames, frame_stride)
    self._seed = clip_seed
    self._data_dir = data_dir
    self._size = (image_size, resize_size, frame_width)
    self.element_shape = (num_frames, image_size, frame_width or image_size, 3)
    if sampling == "dense":
      starts = [dense_starts(v.num_frames, num_frames, frame_stride) for v in self.videos]
      self._video = np.repeat(np.arange(len(self.videos)), [len(s) for s in starts])
      self._start = np.concatenate(starts)
    else:
      self._video = np.repeat(np.arange(len(self.videos)), clips_per_video)
      self._start = None
    # val_fraction and frame_width only when set: grain compares this at restore, and
    # a source without them is the same source.
    held_out = f"val_fraction={val_fraction}, " if val_fraction else ""
    held_out += f"frame_width={frame_width}, " if frame_width else ""
    self._desc = (f"{dataset}, split={which}:{sampling}, split_number={split_number}, "
                  f"num_frames={num_frames}, frame_stride={frame_stride}, "
                  f"image_size={image_size}, resize_size={resize_size}, "
                  f"clips_per_video={clips_per_video}, clip_seed={clip_seed}, {held_out}"
                  f"videos={len(self.videos)}")

  def __len__(self) -> int:
    return len(self._video)

  def video_index(self, index: int) -> int:
    """The video (index into `videos`) of example `index`, without decoding it."""
    return int(self._video[index])

  def frame_indices(self, index: int) -> np.ndarray:
    """0-based frames of example `index` in its video."""
    num_frames, stride = self._clip
    if self._start is not None:
      start = int(self._start[index])
    else:
      length = self.videos[self.video_index(index)].num_frames
      start = random_start(length, num_frames, stride, self._seed, index)
    return start + stride * np.arange(num_frames)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    v = self.video_index(index)
    folder = os.path.join(self._data_dir, self.videos[v].name)
    clip = np.stack([image_folder.decode(frame_path(folder, int(f)), *self._size)
                     for f in self.frame_indices(index)])
    return {"image": clip, "label": np.int32(self.videos[v].label), "video": np.int32(v)}

  def __repr__(self) -> str:
    return f"VideoFramesSource({self._desc}, n={len(self)})"
