"""Action recognition accuracy: clip-level and video-level top-1 of a clip classifier.

DPC's test protocol (TengdaHan/DPC `eval/test.py`): every clip of a video
(the 'dense' sampling of data/video_frames.py: half-overlapping clips that
cover the video) is classified; the softmax is averaged over the clips of
each video and the video is right when the label has the largest mean
probability (video top-1). Clip top-1 scores each clip on its own. Ties go
to the lower class index, as argmax.

  classify_fn(clips uint8 [B, T, H, W, C]) -> [B, num_classes] logits. The
  evaluator passes this process's share of a global batch (B a multiple of
  the mesh size on one process); logits, labels, video ids and masks are
  all-gathered across processes, so a video whose clips were read by several
  processes (or fell into several batches) is averaged over all of them, and
  every process computes the same numbers.

Examples carry their video as the integer key 'video' (ucf101 / hmdb51); a
source without it (moving digits) has one clip per video, and then video
top-1 is clip top-1.

Metrics are named after the split's list: '<list>_clip_top1' and
'<list>_video_top1' ('val_video_top1' on the held-out part of the training
list, for choosing checkpoints; 'test_video_top1' is the reported number).
`max_examples` > 0 evaluates the clips of a fixed random set of whole videos
(seed 0), as many videos as fit in max_examples clips (at least one).
"""
from collections.abc import Callable, Iterator
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from scipy import special

from nda_jax.data import pipeline

ClassifyFn = Callable[[np.ndarray], jax.Array | np.ndarray]
_SUBSET_SEED = 0


class VideoAccuracy:
  """Accumulates clip and video top-1 over batches of (logits, labels, videos, mask).

  Per video it keeps the sum of its clips' softmax, their count and the
  label; `result()` averages. Rows with mask False are ignored.
  """

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self._prob_sums = np.zeros((0, num_classes))
    self._counts = np.zeros(0, np.int64)
    self._labels = np.zeros(0, np.int64)
    self.clips = self.clips_correct = 0

  def add(self, logits: np.ndarray, labels: np.ndarray, videos: np.ndarray,
          mask: np.ndarray) -> None:
    logits = np.asarray(logits)
    if logits.shape != (len(mask), self.num_classes):
      raise ValueError(f"classify_fn returned logits of shape {logits.shape} for a batch of "
                       f"{len(mask)} clips of a {self.num_classes}-class split; expected "
                       f"{(len(mask), self.num_classes)}")
    mask = np.asarray(mask, bool)
    logits, labels, videos = logits[mask], np.asarray(labels)[mask], np.asarray(videos)[mask]
    self.clips += len(labels)
    self.clips_correct += int(np.sum(np.argmax(logits, axis=-1) == labels))
    if not len(labels):
      return
    needed = int(videos.max()) + 1
    if needed > len(self._counts):
      grow = needed - len(self._counts)
      self._prob_sums = np.concatenate([self._prob_sums, np.zeros((grow, self.num_classes))])
      self._counts = np.concatenate([self._counts, np.zeros(grow, np.int64)])
      self._labels = np.concatenate([self._labels, np.full(grow, -1, np.int64)])
    known = self._labels[videos]
    if np.any((known >= 0) & (known != labels)):
      bad = int(videos[np.argmax((known >= 0) & (known != labels))])
      raise ValueError(f"the clips of video {bad} have different labels")
    self._labels[videos] = labels
    np.add.at(self._prob_sums, videos, special.softmax(np.asarray(logits, np.float64), axis=-1))
    np.add.at(self._counts, videos, 1)

  def result(self) -> tuple[float, float, int]:
    """(clip top-1, video top-1, number of videos)."""
    seen = self._counts > 0
    if not seen.any():
      raise ValueError("no clip was evaluated")
    mean = self._prob_sums[seen] / self._counts[seen, None]
    video_correct = np.argmax(mean, axis=-1) == self._labels[seen]
    return self.clips_correct / self.clips, float(video_correct.mean()), int(seen.sum())


def video_subset(video_of_example: np.ndarray, max_examples: int, seed: int) -> np.ndarray:
  """Increasing example indices: the clips of whole videos, drawn in a seeded random order
  while they fit in `max_examples` clips (the first video always); all for 0."""
  n = len(video_of_example)
  if not 0 < max_examples < n:
    return np.arange(n)
  videos, counts = np.unique(video_of_example, return_counts=True)
  order = np.random.default_rng(seed).permutation(len(videos))
  fits = np.cumsum(counts[order]) <= max_examples
  fits[0] = True
  chosen = videos[order[fits]]
  return np.flatnonzero(np.isin(video_of_example, chosen))


class VideoClassificationEvaluator:
  """Clip and video top-1 of `classify_fn` on a split (config: `default_config()`)."""

  requires = ("classify_fn",)

  @staticmethod
  def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "type": "video_classification",
        "every": 0,            # steps between runs; 0: only at the end of training
        "split": "",           # '': data.eval_split; e.g. 'test' or 'val' (dense clips)
        "batch_size": 64,      # clips, global; rounded up to a multiple of the mesh size
        "max_examples": 0,     # 0: the whole split; n: whole videos, up to n clips
    })

  def __init__(self, cfg: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict, *,
               workdir: str | None, mesh: jax.sharding.Mesh):
    del workdir  # writes nothing
    if cfg.batch_size < 1 or cfg.max_examples < 0:
      raise ValueError(f"video_classification evaluator needs batch_size >= 1 and "
                       f"max_examples >= 0; got batch_size={cfg.batch_size}, "
                       f"max_examples={cfg.max_examples}")
    self.cfg = cfg
    self.data_cfg = data_cfg
    self.split = cfg.split or data_cfg.eval_split
    self.prefix = self.split.partition(":")[0]
    devices = mesh.devices.size
    self.batch_size = -(-cfg.batch_size // devices) * devices

  def _data(self) -> pipeline.EvalData:
    data = pipeline.make_eval_iterator(self.data_cfg, self.split, self.batch_size)
    if not self.cfg.max_examples or self.cfg.max_examples >= data.num_examples:
      return data
    source = data.source
    index = getattr(source, "video_index", lambda i: i)   # no video ids: a clip per video
    videos = np.array([index(i) for i in range(data.num_examples)])
    return pipeline.make_eval_iterator(
        self.data_cfg, self.split, self.batch_size,
        examples=video_subset(videos, self.cfg.max_examples, _SUBSET_SEED))

  def run(self, classify_fn: ClassifyFn) -> Iterator[tuple[str, float]]:
    """Classifies every clip of the split; yields ('<list>_clip_top1', acc) and
    ('<list>_video_top1', acc)."""
    start = time.time()
    data = self._data()
    accuracy = VideoAccuracy(data.num_classes)
    gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
    rows = 0
    for batch in data:
      logits = gather(classify_fn(batch["image"]))   # blocks: CPU collectives must not queue up
      labels, mask = gather(batch["label"]), gather(batch["mask"])
      # Without video ids every clip is its own video (ids need only be distinct).
      videos = gather(batch["video"]) if "video" in batch else rows + np.arange(len(mask))
      rows += len(mask)
      accuracy.add(logits, labels, videos, mask)
    clip_top1, video_top1, num_videos = accuracy.result()
    logging.info("video_classification: %d clips of %d videos of %r, %.1f s", accuracy.clips,
                 num_videos, self.split, time.time() - start)
    yield f"{self.prefix}_clip_top1", clip_top1
    yield f"{self.prefix}_video_top1", video_top1
