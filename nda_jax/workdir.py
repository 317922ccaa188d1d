"""A run's workdir as an `etils.epath` path: local folders and buckets (gs://) alike.

Every read or write under a workdir goes through this, so a TPU VM job can
write to a bucket (gs:// needs the `epath-gcs` extra). A bucket path is never
turned into a local one; local paths are made absolute (Orbax requires it).
"""
from etils import epath


def is_local(workdir: "str | epath.Path") -> bool:
  """False for a bucket (gs://...), where files cannot be appended to."""
  return "://" not in str(workdir)


def path(workdir: "str | epath.Path") -> epath.Path:
  if not is_local(workdir):
    return epath.Path(workdir)
  return epath.Path(workdir).absolute()
