"""What every trainer shares: the metrics writer and the progress line."""
import contextlib
import json
import threading
import time
from typing import Mapping

from absl import logging
import jax

from nda_jax import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """JSON-lines log plus TensorBoard event files (tensorboardX: no TensorFlow needed).

  Only process 0 writes; every process may call it. metrics.jsonl goes through
  epath (local or a bucket); TensorBoard events through tensorboardX, which
  writes local folders, and gs:// itself when google-cloud-storage is installed
  (the `gcs` extra). Elsewhere the events are skipped with a warning: the
  same numbers are in metrics.jsonl. A reader of a run (`nda_jax.eval`) writes
  its own `filename` and `tensorboard` folder, never the training run's.
  """

  def __init__(self, workdir: str, filename: str = METRICS_FILE,
               tensorboard: str = "tensorboard", start_step: int | None = None):
    self._active = jax.process_index() == 0
    self._path = workdir_lib.path(workdir) / filename
    self._tb = None
    self._tb_errors = []   # What tensorboardX's writing thread met (_keep_errors).
    # A bucket's objects cannot be appended to (gcsfs silently overwrites): there
    # the file is rewritten with every record.
    self._lines = None
    self._continued = ""
    if self._active:
      self._path.parent.mkdir(parents=True, exist_ok=True)
      text = _complete_lines(self._path)
      if start_step is not None:
        text = _drop_records_after(self._path, text, start_step)
      self._continued = text
      if not workdir_lib.is_local(workdir):
        self._lines = [text] if text else []
      self._tb = _summary_writer(str(workdir_lib.path(workdir) / tensorboard), self._tb_errors)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    line = json.dumps(record) + "\n"
    if self._lines is None:
      with self._path.open("a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))
    if self._tb is not None and self._tb_errors:
      _give_up_events(_file_writers(self._tb), self._tb_errors[0])
      self._tb = None
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def last_value(self, key: str) -> float | None:
    """`key` in the newest record of the run this one continues (None: none, or not process 0)."""
    for line in reversed(self._continued.splitlines()):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and key in record:
        return float(record[key])
    return None

  def close(self) -> None:
    if self._tb is not None:
      _close_summary_writer(self._tb, self._tb_errors)
      self._tb = None


def _drop_records_after(path, text: str, step: int) -> str:
  """A run resumed from `step` (after a fallback, say) logs the later steps again:
  their earlier records go, so every step appears once."""
  kept = [line for line in text.splitlines(keepends=True) if _step_of(line) <= step]
  if len(kept) < len(text.splitlines()):
    logging.warning("%s: %d records past step %d, the step this run resumes from, dropped",
                    path, len(text.splitlines()) - len(kept), step)
    text = "".join(kept)
    path.write_text(text)
  return text


def _step_of(line: str) -> float:
  try:
    return float(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return -1   # Not a record: kept for the readers, which name it.


def _complete_lines(path) -> str:
  """The file's complete lines; a record cut off by a run that died mid-write is
  dropped from the file (with a warning), so the next record starts on a line of its own."""
  if not path.exists():
    return ""
  text = path.read_text()
  if text and not text.endswith("\n"):
    complete = text[:text.rfind("\n") + 1]
    logging.warning("%s:%d is a record cut off mid-write (%r): dropped before appending",
                    path, complete.count("\n") + 1, text[len(complete):][:200])
    path.write_text(complete)
    text = complete
  return text


def _summary_writer(logdir: str, errors: list):
  """tensorboardX's SummaryWriter for `logdir`, or None where it cannot write there;
  what its writing thread meets goes into `errors` (_keep_errors)."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (heavy)
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  if "://" in logdir and not (logdir.startswith("gs://") and record_writer.GCS_ENABLED):
    logging.warning("no TensorBoard events for %s: tensorboardX writes local folders, and "
                    "gs:// with google-cloud-storage installed (pip install -e '.[gcs]'); "
                    "metrics.jsonl has the same numbers", logdir)
    return None
  tb = SummaryWriter(logdir)
  for writer in _file_writers(tb):
    _keep_errors(writer.event_writer._ev_writer, errors)  # pylint: disable=protected-access
  return tb


def _keep_errors(events_file, errors: list) -> None:
  """An exception in tensorboardX's writing thread (a full disk, a bucket out of reach)
  ends that thread, after which its bounded queue fills and the next `add_scalar`
  blocks the training loop for good. Instead the event file's writes and flushes keep
  the first error in `errors` and do nothing after it, so the thread drains the queue
  and MetricWriter gives the events up with one warning."""
  for name in ("write_event", "flush"):
    method = getattr(events_file, name)

    def guarded(*args, _method=method):
      if errors:
        return None
      try:
        return _method(*args)
      except Exception as e:  # pylint: disable=broad-except  (reported by MetricWriter)
        errors.append(e)
        return None
    setattr(events_file, name, guarded)


# How long closing waits for tensorboardX's last flush. Its gs:// writer uploads the
# whole event file then, and google-cloud-storage retries that for up to 120 s when
# the bucket is out of reach (116 s measured against a stopped server).
TB_CLOSE_TIMEOUT_S = 20.0
# How long giving up waits for tensorboardX's thread to take its stop signal: once the
# file's writes are no-ops it drains a queue of at most 10 events at once.
TB_THREAD_STOP_S = 5.0


def _close_summary_writer(tb, errors: list) -> None:
  """Closes tensorboardX's writer. Its last flush may fail or hang (a full disk, a bucket
  out of reach): the pending events are then given up (_give_up_events)."""
  writers = _file_writers(tb)   # (tb.close() forgets them)

  def close():
    try:
      tb.close()
    except Exception as e:  # pylint: disable=broad-except  (reported below)
      errors.append(e)
  closing = threading.Thread(target=close, daemon=True)
  closing.start()
  closing.join(TB_CLOSE_TIMEOUT_S)
  if errors or closing.is_alive():
    _give_up_events(writers, errors[0] if errors else f"not done after {TB_CLOSE_TIMEOUT_S:.0f} s")
    return
  for writer in writers:   # Closed; but a gs:// file uploads itself again when collected.
    _no_more_uploads(writer.event_writer)


def _file_writers(tb) -> list:
  return list((tb.all_writers or {}).values())


def _give_up_events(writers: list, why: Exception | str) -> None:
  """One warning (metrics.jsonl holds the numbers), then the event files abandoned:
  tensorboardX's atexit hook and the files' finalizers would each flush again, ending
  the run's output with a traceback or another 120 s of retries."""
  if isinstance(why, Exception):
    why = f"{type(why).__name__}: {str(why)[:300]}"
  logging.warning("TensorBoard events in %s not all written (%s); metrics.jsonl has the "
                  "same numbers", writers[0].get_logdir() if writers else "?", why)
  for writer in writers:
    _abandon(writer.event_writer)


def _abandon(events) -> None:
  """tensorboardX's EventFileWriter marked closed (its atexit hook skips it), its thread
  stopped (else, still waiting on its queue at exit, it dies with a traceback when the
  queue is closed), and the file under it closed without a flush: a local file closes
  even when its flush fails; a gs:// one no longer flushes, so its finalizer uploads
  nothing."""
  # pylint: disable=protected-access
  events._closed = True
  worker = events._worker
  if worker is not None and worker.is_alive():
    try:
      events._event_queue.put(worker._shutdown_signal, timeout=TB_THREAD_STOP_S)
    except Exception:  # pylint: disable=broad-except  (a queue that stays full: a stuck thread)
      pass
    worker.join(TB_THREAD_STOP_S)
  if not _no_more_uploads(events):
    try:
      events._ev_writer._py_recordio_writer._writer.close()
    except OSError:
      pass


def _no_more_uploads(events) -> bool:
  """True for a gs:// event file, whose flush is then a no-op: tensorboardX's
  GCSRecordWriter uploads the whole file on every close, including the one its
  finalizer runs at exit (up to 120 s of retries when the bucket is gone)."""
  target = events._ev_writer._py_recordio_writer._writer  # pylint: disable=protected-access
  if not hasattr(target, "blob"):
    return False
  target.flush = lambda: None
  return True


def read_metrics(workdir: str, filename: str = METRICS_FILE) -> list[dict]:
  """The records a run wrote to `workdir/metrics.jsonl` (for plots and tests); a line
  that is not one (cut off by a crash) is skipped with a warning naming file and line."""
  path = workdir_lib.path(workdir) / filename
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} the workdir of a run?")
  records = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if not isinstance(record, dict) or "step" not in record:
      logging.warning("%s:%d is not a metrics record (%r): skipped", path, number, line[:200])
      continue
    records.append(record)
  return records


def format_duration(seconds: float) -> str:
  """'1m48s', '3h12m', '45s': what a person reads at a glance."""
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = int(round(max(seconds, 0.0)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class Progress:
  """Throughput, input waits and device-hours between log points, and the progress line.

  The loop takes each host batch through `next_batch`, so the time it waited on
  the input pipeline is known; time in `paused()` (evaluation, checkpoints,
  artifacts) counts towards device-hours but not towards a step's time.
  Device-hours are all the devices' time since the run began, carried over a
  resume through `device_hours` (big_vision's core_hours).
  """

  def __init__(self, total_steps: int, examples_per_step: int, first_step: int,
               num_devices: int, device_hours: float = 0.0):
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self.num_devices = num_devices
    self.device_hours = device_hours
    self._t = time.perf_counter()
    self._step = first_step
    self._waited = 0.0
    self._paused = 0.0

  def next_batch(self, iterator):
    start = time.perf_counter()
    try:
      return next(iterator)
    finally:
      self._waited += time.perf_counter() - start

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    wall = now - self._t
    stepping = max(wall - self._paused, 1e-9)
    sec_per_step = stepping / max(step - self._step, 1)
    self.device_hours += wall * self.num_devices / 3600
    img_per_sec = self.examples_per_step / sec_per_step
    scalars = {"img_per_sec": img_per_sec,
               "img_per_sec_per_device": img_per_sec / self.num_devices,
               "sec_per_step": sec_per_step,
               "input_wait_fraction": min(self._waited / stepping, 1.0),
               "device_hours": self.device_hours,
               "eta_sec": (self.total_steps - step) * sec_per_step}
    self._t, self._step, self._waited, self._paused = now, step, 0.0, 0.0
    return scalars

  @staticmethod
  def line(step: int, total: int, scalars: Mapping[str, float]) -> str:
    rest = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()) if k not in _SHOWN)
    return (f"step {step}/{total} | {scalars.get('img_per_sec', 0):.1f} img/s "
            f"({scalars.get('img_per_sec_per_device', 0):.1f}/device) | "
            f"input wait {scalars.get('input_wait_fraction', 0):.0%} | "
            f"{scalars.get('device_hours', 0):.3g} device-h | "
            f"ETA {format_duration(scalars.get('eta_sec', float('nan')))} | {rest}")


_SHOWN = ("img_per_sec", "img_per_sec_per_device", "input_wait_fraction", "device_hours",
          "eta_sec", "sec_per_step")
