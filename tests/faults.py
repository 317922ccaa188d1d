r"""Runs a command as if a folder's file system refused writes (tests run as root, where
permissions refuse nothing, and mounting a small tmpfs needs privileges CI may lack).

  python -m faults ENOSPC|EROFS FOLDER [SUBSTRING] -- MODULE ARGS...

Python-level writes under FOLDER raise OSError(errno, ..., path) as the kernel would:
on a read-only mount (EROFS) opening a file to write, creating, renaming or deleting an
entry fails; on a full disk (ENOSPC) creating a folder fails, and a file opens (so
"w" truncates it, as on a real full disk) but every write to it fails. Reads are
untouched. With SUBSTRING, only paths holding it fail (a disk that fills up at that
file). Then MODULE runs as `python -m MODULE ARGS...`. Writes by tensorstore's C++ code (checkpoint arrays)
are not seen: their real ENOSPC message is tested in test_bad_input.py.
"""
import builtins
import errno
import io
import os
import runpy
import sys


def install(code: int, folder: str, substring: str = "") -> None:
  folder = os.path.abspath(folder)

  def refused(path) -> bool:
    if isinstance(path, int):
      return False
    path = os.path.abspath(os.fsdecode(path))
    return (path == folder or path.startswith(folder + os.sep)) and substring in path

  def fail(path):
    raise OSError(code, os.strerror(code), os.fsdecode(path))

  real_open, real_os_open, real_os_write = builtins.open, os.open, os.write
  full = code == errno.ENOSPC
  full_fds = set()

  class FullFile:
    """A file opened on a full disk: everything but writing works."""

    def __init__(self, file, path):
      self._file, self._path = file, path

    def write(self, data):
      fail(self._path)

    def writelines(self, lines):
      fail(self._path)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._file.close()

    def __iter__(self):
      return iter(self._file)

    def __getattr__(self, name):
      return getattr(self._file, name)

  def open_(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and refused(file):
      if not full:
        fail(file)
      return FullFile(real_open(file, mode, *args, **kwargs), file)
    return real_open(file, mode, *args, **kwargs)

  def os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and refused(path):
      if not full:
        fail(path)
      fd = real_os_open(path, flags, *args, **kwargs)
      full_fds.add(fd)
      return fd
    return real_os_open(path, flags, *args, **kwargs)

  def os_write(fd, data):
    if fd in full_fds:
      raise OSError(code, os.strerror(code))
    return real_os_write(fd, data)

  builtins.open = io.open = open_
  os.open, os.write = os_open, os_write
  for name in ("mkdir",) if full else ("mkdir", "rmdir", "remove", "unlink"):
    real = getattr(os, name)

    def one(path, *args, _real=real, **kwargs):
      if refused(path):
        fail(path)
      return _real(path, *args, **kwargs)
    setattr(os, name, one)
  for name in () if full else ("rename", "replace"):
    real = getattr(os, name)

    def two(src, dst, *args, _real=real, **kwargs):
      if refused(src) or refused(dst):
        fail(dst)
      return _real(src, dst, *args, **kwargs)
    setattr(os, name, two)


def main(argv: list[str]) -> None:
  split = argv.index("--")
  code, folder, *substring = argv[1:split]
  install(getattr(errno, code), folder, *substring)
  module, *args = argv[split + 1:]
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main(sys.argv)
