"""Host input pipelines (grain): per-process uint8 batches with resumable state.

Train: an endless (or `num_epochs`) shuffled stream of this process's share
of the global batch, built with grain's dataset API (MapDataset: shuffle,
repeat, batch). Each process reads a fixed, disjoint, contiguous
1/process_count of the examples (the remainder is dropped, so every process
has the same number of batches) and reshuffles it every epoch; batches run
across epoch boundaries. Batches are prepared ahead in `cfg.read_threads`
threads (default 1), or in `cfg.worker_count` > 0 processes; neither changes
their order. `get_state()` / `set_state()` checkpoint the position exactly.
grain's DataLoader is not used for training: its per-record bookkeeping costs
more than a GPU step per batch (README, "Measured"). Turning host batches into
one global jax.Array is parallel.py's job.

Random crops (`cfg.crops`): 'device' (the default) leaves them to the
trainer, which crops the decoded example; 'host' (image folders) makes
`cfg.views` = {num, size, scale, ratio} RandomResizedCrops of the original
image per training example (crops.py), uint8 [num, size, size, 3]; 'canvas'
(image folders) ships the decoded photo (the part holding the views' boxes)
in a uint8 [C, C, 3] canvas (C = `cfg.canvas_size`) with the boxes, 'boxes'
float32 [num, 4], and the trainer resizes them on device. Boxes are drawn from (seed, epoch, record
index), so a restored position and any worker count give the same views.
Eval splits are decoded as always.

Eval: one deterministic pass over a split; the last batch is padded and
`mask` marks real examples, so every example counts exactly once and every
process yields the same number of batches.

grain reads absl flags in worker processes: under `absl.app.run` that just
works; elsewhere (notebooks, pytest) the flags are marked as parsed here
(docs/jax_notes.md). Eval records are whole batches, so its output does not
depend on worker_count.
"""
from collections.abc import Iterator
import json
import math

import chex
import grain
import grain.python as gp
import ml_collections
import numpy as np

from nda_jax.data import crops
from nda_jax.data import sources

Batch = dict[str, np.ndarray]


def _processes(process_index: int | None,
               process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index < process_count, got "
                     f"{process_index}, {process_count}.")
  return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive "
                     f"multiple of the process count {process_count}.")
  return global_batch_size // process_count


def _worker_count(cfg: ml_collections.ConfigDict) -> int:
  count = cfg.get("worker_count", 0)
  if count:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  return count


def _check_batch(batch: Batch, size: int, shape: tuple[int, ...],
                 boxes: int | None = None) -> Batch:
  chex.assert_shape(batch["image"], (size, *shape))
  chex.assert_type(batch["image"], np.uint8)
  chex.assert_shape(batch["label"], (size,))
  chex.assert_type(batch["label"], np.int32)
  if boxes is not None:
    chex.assert_shape(batch["boxes"], (size, boxes, 4))
    chex.assert_type(batch["boxes"], np.float32)
  return batch


class TrainIterator(Iterator[Batch]):
  """Yields {'image': uint8 [b, *element_shape], 'label': int32 [b]}, and with a canvas
  'boxes': float32 [b, num_boxes, 4]."""

  def __init__(self, dataset: grain.IterDataset, source: sources.Source, batch_size: int,
               element_shape: tuple[int, ...], num_boxes: int | None = None):
    self._iter = iter(dataset)
    self.source = source
    self.batch_size = batch_size
    self.num_classes = source.num_classes
    self.element_shape = tuple(element_shape)
    self.num_boxes = num_boxes

  def __next__(self) -> Batch:
    return _check_batch(next(self._iter), self.batch_size, self.element_shape,
                        self.num_boxes)

  def get_state(self) -> bytes:
    """Position in the stream (JSON bytes), for the checkpoint."""
    return json.dumps(self._iter.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    """Continues exactly after the batch at which `state` was taken."""
    self._iter.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore."""
    start = getattr(self._iter, "start_prefetch", None)
    if start is not None:
      start()

  def close(self) -> None:
    """Stops the prefetch threads or worker processes."""
    self._iter.close()


def make_train_iterator(cfg: ml_collections.ConfigDict, global_batch_size: int,
                        seed: int, *, process_index: int | None = None,
                        process_count: int | None = None,
                        num_epochs: int | None = None) -> TrainIterator:
  """Shuffled training batches of `cfg.train_split` (default 'train').

  Args:
    cfg: the `data` config (see sources.py); also `train_split`, `read_threads`,
      `worker_count`.
    global_batch_size: examples per step over all processes.
    seed: shuffle seed (taken modulo 2**32).
    process_index, process_count: this process's shard; default from JAX.
    num_epochs: None repeats forever.
  """
  process_index, process_count = _processes(process_index, process_count)
  batch_size = _local_batch(global_batch_size, process_count)
  source = sources.make_source(cfg, cfg.get("train_split", "train"))
  per_process = len(source) // process_count
  if per_process < batch_size and num_epochs is not None:
    raise ValueError(f"{source!r} gives each of {process_count} processes fewer "
                     f"than one batch of {batch_size} per epoch.")
  start = process_index * per_process
  spec, canvas = view_spec(cfg), canvas_size(cfg)
  if spec is None:
    dataset = grain.MapDataset.source(source)[start:start + per_process]
  else:
    if not hasattr(source, "views"):
      raise ValueError(f"config.data.crops={cfg.crops!r} crops the original images of an "
                       f"image folder; {source!r} holds decoded arrays: use "
                       "--config.data.crops=device.")
    dataset = grain.MapDataset.range(start, start + per_process)
  dataset = dataset.shuffle(seed=int(seed) % 2**32).repeat(num_epochs)
  workers = _worker_count(cfg)
  read = grain.ReadOptions(num_threads=cfg.get("read_threads", 1), prefetch_buffer_size=2)
  if canvas is not None:   # whole batches decoded into one array: no per-image canvas to stack
    dataset = dataset.map_with_index(_positioned).batch(batch_size, drop_remainder=True)
    decode = _CanvasBatch(source, spec, seed, per_process, canvas, shared=workers > 0)
    # Worker processes decode in their own loop, straight into the shared memory that
    # carries the batch to this process (else grain copies it there).
    dataset = (dataset.to_iter_dataset(read).map(decode) if workers
               else dataset.map(decode).to_iter_dataset(read))
  else:
    if spec is not None:
      dataset = dataset.map_with_index(_HostViews(source, spec, seed, per_process))
    dataset = dataset.batch(batch_size, drop_remainder=True).to_iter_dataset(read)
  if workers:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  if canvas is not None:
    return TrainIterator(dataset, source, batch_size, (canvas, canvas, 3), spec.num)
  return TrainIterator(dataset, source, batch_size,
                       source.element_shape if spec is None else spec.shape)


CROPS = ("device", "host", "canvas")


def _crops(cfg: ml_collections.ConfigDict) -> str:
  where = cfg.get("crops", "device")
  if where not in CROPS:
    raise ValueError(f"config.data.crops={where!r}; valid choices: {CROPS}.")
  return where


def view_spec(cfg: ml_collections.ConfigDict) -> crops.ViewSpec | None:
  """The views cut from the original photo ('host' or 'canvas' crops of `cfg`, the data
  config), None when the trainer crops the decoded image on device."""
  where = _crops(cfg)
  if where == "device":
    return None
  views = cfg.get("views")
  if views is None:
    raise ValueError(f"config.data.crops={where!r} needs config.data.views "
                     "(num, size, scale, ratio).")
  return crops.ViewSpec(num=int(views.num), size=int(views.size),
                        scale=tuple(float(v) for v in views.scale),
                        ratio=tuple(float(v) for v in views.ratio))


def canvas_size(cfg: ml_collections.ConfigDict) -> int | None:
  """C of `cfg.crops='canvas'` (photos shipped in C x C with their boxes), else None."""
  if _crops(cfg) != "canvas":
    return None
  spec, size = view_spec(cfg), cfg.get("canvas_size")
  if not isinstance(size, int) or isinstance(size, bool) or size < spec.size:
    raise ValueError(f"config.data.crops='canvas' ships each photo in a canvas of "
                     f"config.data.canvas_size pixels a side, which must be an integer of at "
                     f"least the view size config.data.views.size={spec.size} (photos "
                     f"larger than the canvas are shrunk to fit); got {size!r}. Set e.g. "
                     "--config.data.canvas_size=500 (ImageNet's photos are mostly 500 px on "
                     "the longer side).")
  return size


class _HostViews:
  """(position in the stream, record index) -> the record's host views in that epoch."""

  def __init__(self, source: sources.ImageFolderSource, spec: crops.ViewSpec, seed: int,
               per_epoch: int):
    self._source, self._spec, self._seed, self._per_epoch = source, spec, seed, per_epoch

  def __call__(self, position: int, index: int) -> Batch:
    rng = crops.example_rng(self._seed, position // self._per_epoch, index)
    return self._source.views(int(index), self._spec, rng)


def _positioned(position: int, index: int) -> np.ndarray:
  return np.array([position, index], np.int64)


class _CanvasBatch:
  """[b, 2] (position in the stream, record index) -> the batch's photos in canvases, their
  boxes in that epoch and labels; `shared`: the canvases in grain's shared memory (a worker
  process's output, unlinked by the process that receives it)."""

  def __init__(self, source: sources.ImageFolderSource, spec: crops.ViewSpec, seed: int,
               per_epoch: int, canvas: int, shared: bool = False):
    self._source, self._spec, self._seed, self._per_epoch = source, spec, seed, per_epoch
    self._canvas, self._shared = canvas, shared

  def __call__(self, records: np.ndarray) -> Batch:
    n, c = len(records), self._canvas
    shape = (n, c, c, 3)
    images = (grain.multiprocessing.SharedMemoryArray(shape, np.uint8) if self._shared
              else np.zeros(shape, np.uint8))   # both start as zeros
    batch = {"image": images, "boxes": np.empty((n, self._spec.num, 4), np.float32),
             "label": np.empty(n, np.int32)}
    try:
      for j, (position, index) in enumerate(records):
        rng = crops.example_rng(self._seed, position // self._per_epoch, index)
        batch["boxes"][j], batch["label"][j] = self._source.canvas(
            int(index), self._spec, rng, images[j])
    except BaseException:
      if self._shared:
        images.unlink_on_del()   # nobody receives it
      raise
    return batch


class _EvalBatches:
  """Batch j of `source` at `indices` (index -1: a zero example, mask False).

  Every integer key of the examples goes along ('label', and e.g. 'video',
  which video-level evaluation averages over), zero in padding rows; the keys
  are those of the split's first example. Whole batches are the records, so
  grain workers cannot split one (each worker would otherwise batch its own
  examples and leave partial batches).
  """

  def __init__(self, source: sources.Source, indices: np.ndarray, batch_size: int):
    self._source = source
    self._indices = indices.reshape(-1, batch_size)
    first = source[0] if len(source) else {"label": np.int32(0)}
    self._int_keys = sorted({"label"} | {k for k, v in first.items() if k != "image"
                                         and np.issubdtype(np.asarray(v).dtype, np.integer)
                                         and np.ndim(v) == 0})
    self._blank = {"image": np.zeros(source.element_shape, np.uint8),
                   **{k: np.int32(0) for k in self._int_keys}}

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, j: int) -> Batch:
    rows = self._indices[j]
    examples = [self._source[int(i)] if i >= 0 else self._blank for i in rows]
    return {"image": np.stack([e["image"] for e in examples]),
            **{k: np.array([e[k] for e in examples], np.int32) for k in self._int_keys},
            "mask": rows >= 0}

  def __repr__(self) -> str:
    return f"_EvalBatches({self._source!r}, batches={len(self)})"


class EvalData:
  """Re-iterable: each pass yields the split once: 'image', 'label', the examples' other
  integer keys (int32 [b]) and `mask` [b] (bool)."""

  def __init__(self, loader: gp.DataLoader, source: sources.Source,
               batch_size: int, num_batches: int, num_examples: int):
    self._loader = loader
    self.source = source
    self.batch_size = batch_size
    self.num_classes = source.num_classes
    self.element_shape = tuple(source.element_shape)
    self.num_examples = num_examples
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[Batch]:
    for batch in self._loader:
      chex.assert_shape(batch["mask"], (self.batch_size,))
      chex.assert_type(batch["mask"], bool)
      yield _check_batch(batch, self.batch_size, self.element_shape)


def make_eval_iterator(cfg: ml_collections.ConfigDict, split: str,
                       batch_size: int, *, process_index: int | None = None,
                       process_count: int | None = None,
                       examples: np.ndarray | None = None) -> EvalData:
  """Every example of `split` (or those at the indices `examples`) once, in order,
  over padded global batches.

  Process p reads the p-th contiguous block of ceil(N / process_count) of the
  N examples; `batch_size` is global, as in training. `examples` (increasing
  indices into the split) reads a subset without decoding the rest.
  """
  process_index, process_count = _processes(process_index, process_count)
  local = _local_batch(batch_size, process_count)
  source = sources.make_source(cfg, split)
  selected = np.arange(len(source)) if examples is None else np.asarray(examples, np.int64)
  if selected.ndim != 1 or np.any(np.diff(selected) <= 0) or (
      len(selected) and not 0 <= selected[0] <= selected[-1] < len(source)):
    raise ValueError(f"examples must be increasing indices into the {len(source)} examples of "
                     f"{source!r}")
  n = len(selected)
  per_process = math.ceil(n / process_count)
  num_batches = math.ceil(per_process / local)
  start = process_index * per_process
  mine = selected[start:min(start + per_process, n)]
  indices = np.full(num_batches * local, -1, np.int64)
  indices[:len(mine)] = mine
  batches = _EvalBatches(source, indices, local)
  loader = gp.DataLoader(
      data_source=batches,
      sampler=gp.IndexSampler(len(batches), gp.NoSharding(), shuffle=False,
                              num_epochs=1),
      worker_count=_worker_count(cfg))
  return EvalData(loader, source, local, num_batches, n)
