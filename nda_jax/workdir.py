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


def move_tree(source: epath.Path, destination: epath.Path) -> None:
  """Moves a folder. A bucket has no folders to create or rename (`mkdir` makes
  nothing, `rename` needs the target's parent), so there each object is copied,
  then the source removed: the objects are never only half gone."""
  if is_local(source):
    destination.parent.mkdir(parents=True, exist_ok=True)
    source.rename(destination)
    return
  for item in files(source):
    item.copy(destination / item.relative_to(source))
  source.rmtree()


def files(folder: epath.Path) -> list[epath.Path]:
  """Every file below `folder` (epath refuses `**` on buckets)."""
  found = []
  for item in sorted(folder.iterdir()):
    found.extend(files(item) if item.is_dir() else [item])
  return found
