"""`python tests/count_main.py --config=... --workdir=DIR`: nda_jax.main counting host syncs.

Counts calls of every `jax.experimental.multihost_utils` function (device
collectives read by the host) and of `jax.device_get` (host reads), and writes
the counts as JSON to $NDA_COUNT_FILE at exit, for tests that compare runs of
different lengths.
"""
import atexit
import collections
import json
import os

from absl import app
from absl import flags
import jax
from jax.experimental import multihost_utils

from nda_jax import main as nda_main

COUNTS = collections.Counter()


def _counted(module, name):
  real = getattr(module, name)

  def wrapper(*args, **kwargs):
    COUNTS[name] += 1
    return real(*args, **kwargs)
  setattr(module, name, wrapper)


for _name in ("process_allgather", "broadcast_one_to_all", "sync_global_devices",
              "reached_preemption_sync_point", "host_local_array_to_global_array",
              "global_array_to_host_local_array"):
  _counted(multihost_utils, _name)
_counted(jax, "device_get")
atexit.register(lambda: json.dump(dict(COUNTS), open(os.environ["NDA_COUNT_FILE"], "w")))

if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(nda_main.main)
