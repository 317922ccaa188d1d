"""Data parallelism: one per-device step function, run with shard_map (default) or pmap.

A step is written once as a per-device function that averages what it must over
the named axis `AXIS` (gradients, BN statistics, metrics). `DataParallel` runs
it either with `jax.shard_map` under `jax.jit` over a 1-D `Mesh(('data',))`, or
with `jax.pmap`; both must give the same numbers. The canonical (host-side,
checkpointed) state is always unreplicated: `put_state` / `get_state` convert.
"""
import collections
import dataclasses
import functools
import itertools
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"
PARALLEL_KINDS = ("shard_map", "pmap")

PyTree = Any


def maybe_initialize_distributed() -> None:
  """Joins a multi-process job when the launcher set the coordinator variables.

  The launch scripts in `launch/` export NDA_COORDINATOR, NDA_NUM_PROCESSES and
  NDA_PROCESS_ID; TPU VMs and SLURM need no variables (jax auto-detects them and
  NDA_DISTRIBUTED=auto asks for that).
  """
  if os.environ.get("NDA_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["NDA_COORDINATOR"],
        num_processes=int(os.environ["NDA_NUM_PROCESSES"]),
        process_id=int(os.environ["NDA_PROCESS_ID"]),
        initialization_timeout=int(os.environ.get("NDA_INIT_TIMEOUT", "300")))
  elif os.environ.get("NDA_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  logging.info("process %d/%d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())


_BARRIERS = itertools.count()
COMPILE_WAIT_S = 3600   # How long a process waits for its peers to compile a step.


def compile_together(jitted_fn: Callable[..., Any], *args: Any) -> None:
  """With several processes: compiles `jitted_fn` for `args`, then waits for every peer.

  Hosts compile at different speeds, and the first collective of a step must find
  its peers ready: on CPU, gloo gives up connecting after 30 s. The wait is a
  barrier of the coordination service, which has no such limit. The program is
  cached, so the first call does not compile it again.
  """
  if jax.process_count() == 1:
    return
  jitted_fn.lower(*args).compile()
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  multihost.get_barrier_sync_fn()(key=f"nda_jax_compiled_{next(_BARRIERS)}",
                                  timeout_ms=COMPILE_WAIT_S * 1000)


_STOPS = itertools.count()
STOP_LEAD = 2   # Steps in flight per host: how far one host may run ahead of another.


class StopAgreement:
  """Every process stops after the same step, whichever one was signalled.

  No collective per step: the signalled process announces step + STOP_LEAD + 1
  in the coordination service's key-value store (the first announcement wins)
  and every process polls the store once per step (one non-blocking RPC, no
  device work). `throttle` keeps at most STOP_LEAD steps in flight: a host
  dispatches step t only once its step t - STOP_LEAD finished, whose collectives
  needed every peer to have dispatched it. So no host runs more than STOP_LEAD
  steps ahead of another, and each reaches the announced step only after the
  announcing host wrote it.
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._key = f"nda_jax/stop/{next(_STOPS)}/"   # Every process calls in the same order.
    self._stop: int | None = None
    self._in_flight: collections.deque = collections.deque()

  def throttle(self, step_outputs: Any) -> None:
    if not self._multi:
      return
    self._in_flight.append(step_outputs)
    if len(self._in_flight) > STOP_LEAD:
      jax.block_until_ready(self._in_flight.popleft())

  def should_stop(self, step: int, requested: bool) -> bool:
    """Whether the loop stops after `step` (just dispatched)."""
    if not self._multi:
      return requested
    if self._stop is None:
      self._stop = self._read()
      if self._stop is None and requested:
        self._stop = self._announce(step + STOP_LEAD + 1)
      if self._stop is not None and step > self._stop:
        raise RuntimeError(f"this process is at step {step}, past the agreed stop step "
                           f"{self._stop}: the hosts drifted more than {STOP_LEAD} steps apart")
    return self._stop is not None and step >= self._stop

  def _client(self):
    from jax._src import distributed  # pylint: disable=g-import-not-at-top  (no public KV API)
    return distributed.global_state.client

  def _read(self) -> int | None:
    entries = self._client().key_value_dir_get(self._key)
    return int(entries[0][1]) if entries else None

  def _announce(self, stop: int) -> int:
    try:
      self._client().key_value_set(self._key + "at", str(stop))
      return stop
    except jax.errors.JaxRuntimeError:   # A peer announced first: its step holds.
      return self._read()


def must_block_each_step() -> bool:
  """XLA:CPU's collective rendezvous dead-locks on back-to-back collective steps.

  Blocking on each step's output avoids it; on GPU/TPU blocking would only
  waste async dispatch, so it is done on CPU with several devices only.
  """
  return jax.default_backend() == "cpu" and jax.device_count() > 1


def example_index(local_batch: int) -> jax.Array:
  """Global index of each example of this device's shard (inside a step).

  Per-sample randomness is folded from it, so a run's numbers do not depend on
  how many devices share the batch.
  """
  return jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)


def per_example_keys(rng: jax.Array, local_batch: int) -> jax.Array:
  """One key per example of this device's shard, folded from the global index."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_index(local_batch))


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """Runs per-device step functions over all devices along the axis `AXIS`.

  `batch_axis` of a host batch is the axis split across devices (1 for batches
  shaped [num_D_steps, B, ...], 0 for [B, ...]).
  """
  kind: str = "shard_map"
  max_devices: int = 0   # 0: all devices; n: the first n (single-process only)

  def __post_init__(self):
    if self.kind not in PARALLEL_KINDS:
      raise ValueError(f"config.parallel={self.kind!r}; valid choices: {PARALLEL_KINDS}")
    if self.max_devices and jax.process_count() > 1:
      raise ValueError("max_devices applies to single-process runs only")

  @functools.cached_property
  def devices(self) -> list[jax.Device]:
    devices = jax.devices()
    return devices[:self.max_devices] if self.max_devices else devices

  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    return jax.make_mesh((len(self.devices),), (AXIS,), devices=self.devices,
                         axis_types=(jax.sharding.AxisType.Explicit,))

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def _local_devices(self) -> list[jax.Device]:
    return [d for d in self.devices if d.process_index == jax.process_index()]

  # ---------------------------------------------------------------- state
  def put_state(self, state: PyTree) -> PyTree:
    """Canonical state -> replicated device state."""
    if self.kind == "pmap":
      return jax.tree.map(lambda a: _replicate_pmap(a, len(self._local_devices)), state)
    return jax.device_put(state, NamedSharding(self.mesh, P()))

  def get_state(self, state: PyTree) -> PyTree:
    """Replicated device state -> canonical state (what is checkpointed)."""
    if self.kind == "pmap":
      return jax.tree.map(lambda a: a[0], state)
    return state

  def replicated_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  # ---------------------------------------------------------------- data
  def shard_batch(self, host_batch: PyTree, batch_axis: int = 0) -> PyTree:
    """This process's share of the global batch -> arrays split over devices."""
    if self.kind == "pmap":
      n = len(self._local_devices)

      def split(x):
        x = np.asarray(x)
        if x.shape[batch_axis] % n:
          raise ValueError(f"batch axis {batch_axis} of shape {x.shape} is not divisible by "
                           f"{n} local devices")
        x = np.moveaxis(x, batch_axis, 0)
        x = x.reshape((n, x.shape[0] // n) + x.shape[1:])
        x = np.moveaxis(x, 1, batch_axis + 1)
        return x
      return jax.tree.map(split, host_batch)

    def put(x):
      x = np.asarray(x)
      spec = P(*([None] * batch_axis + [AXIS]))
      return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), x)
    return jax.tree.map(put, host_batch)

  # ---------------------------------------------------------------- steps
  def step(self, per_device_fn: Callable[..., Any], batch_axis: int = 0,
           donate_state: bool = True) -> Callable[[PyTree, PyTree], Any]:
    """Wraps `per_device_fn(state, batch) -> (state, metrics)` for all devices.

    The returned state and metrics must be replicated across devices (the
    function averages them with collectives over `AXIS`).
    """
    donate = (0,) if donate_state else ()
    if self.kind == "pmap":
      return jax.pmap(per_device_fn, axis_name=AXIS, donate_argnums=donate,
                      devices=self.devices)
    batch_spec = P(*([None] * batch_axis + [AXIS]))
    # check_vma=False: gradients of replicated params w.r.t. per-device losses
    # stay per-device (as under pmap) and are averaged explicitly with pmean.
    mapped = jax.shard_map(per_device_fn, mesh=self.mesh, in_specs=(P(), batch_spec),
                           out_specs=P(), check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)

  def map_fn(self, per_device_fn: Callable[..., Any], in_specs, out_specs) -> Callable[..., Any]:
    """A jitted function over the mesh with explicit specs (evaluation, sampling)."""
    return jax.jit(jax.shard_map(per_device_fn, mesh=self.mesh, in_specs=in_specs,
                                 out_specs=out_specs, check_vma=False))

  def map_over_batch(self, per_device_fn: Callable[..., Any]) -> Callable[..., jax.Array]:
    """`fn(state, host_batch)` for evaluation: `per_device_fn(state, shard)` over the mesh.

    The state is replicated; this process's host batch becomes one global array
    along AXIS, whatever `kind` is (evaluation always runs through shard_map, so
    pmap's per-device stacking does not apply); outputs are per example.
    """
    batch = P(AXIS)
    mapped = self.map_fn(per_device_fn, in_specs=(P(), batch), out_specs=batch)
    sharding = NamedSharding(self.mesh, batch)
    return lambda state, host_batch: mapped(
        state, jax.make_array_from_process_local_data(sharding, np.asarray(host_batch)))

  def unreplicate_metrics(self, metrics: PyTree) -> dict[str, float]:
    if self.kind == "pmap":
      metrics = jax.tree.map(lambda a: a[0], metrics)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def default_mesh() -> jax.sharding.Mesh:
  """All devices along `AXIS`: the mesh of `DataParallel()`, for tools that run outside a trainer."""
  return DataParallel().mesh


def _replicate_pmap(a, num_devices: int):
  """`device_put_replicated` is gone from jax: stack one copy per device; pmap places it."""
  return np.stack([np.asarray(jax.device_get(a))] * num_devices)
