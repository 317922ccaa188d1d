"""What must not change: every file under a folder, for before/after comparisons."""
import os


def tree(folder) -> dict[str, bytes]:
  """{relative path: bytes} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out
