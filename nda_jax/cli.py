"""What every command shares: a user's mistake ends in one line that says what to do.

`run(main, prog)` is absl's `app.run` with a flag parser that turns each
parsing error (an unknown `--config.<key>`, naming the close ones; a value of
the wrong type; a config file that cannot be loaded) into
`<prog>: error: <message>` on stderr and exit status 1, without a traceback.
A command's `main` reports its own user errors with `fail`; `run` also turns
the errors no command can prevent into that paragraph: a missing optional
dependency (`extras.MissingExtraError`) and a file system that refuses a
write (full, read-only, not permitted).
"""
from collections.abc import Callable, Sequence
import errno
import functools
import os
import re
import sys
import traceback
from typing import Any, NoReturn

from absl import app
from absl import flags

from nda_jax import config_lib
from nda_jax import extras

# OSErrors of a storage that refuses a write: the user's to fix (free space,
# permissions), not a bug, so they end in one paragraph.
_STORAGE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
  """A user error: one paragraph on stderr, no traceback."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(code)


def _innermost(error: BaseException) -> BaseException:
  """The first error of a chain (ml_collections re-raises a config file's error with its
  traceback pasted into the message)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def _chain(error: BaseException) -> list[BaseException]:
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def describe_storage_error(error: BaseException) -> str | None:
  """The paragraph for a write the file system refused, or None for any other error.

  Orbax and tensorstore re-raise such errors wrapped (with the errno only in the
  message), so the whole chain is searched.
  """
  for e in _chain(error):
    code = e.errno if isinstance(e, OSError) else None
    if code not in _STORAGE_ERRORS:
      text = str(e)
      code = next((c for c in _STORAGE_ERRORS if os.strerror(c) in text), None)
      if code is None:
        continue
    quoted = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(e))  # tensorstore's
    where = getattr(e, "filename", None) or (quoted.group(1) if quoted else "a file")
    verb = "access" if code in (errno.EACCES, errno.EPERM) else "write"
    return (f"cannot {verb} {where}: {_STORAGE_ERRORS[code]} ({os.strerror(code)}). Free "
            f"space or make that folder writable (or pass another --workdir/--out), then run "
            f"the command again: what was written before is kept, and a training run resumes "
            f"from its last complete checkpoint.")
  return None


def guard(main: Callable[[list[str]], Any], prog: str) -> Callable[[list[str]], Any]:
  """`main` with the errors no command can prevent turned into one paragraph."""

  @functools.wraps(main)
  def guarded(argv: list[str]) -> Any:
    try:
      return main(argv)
    except ImportError as e:
      missing = extras.as_missing_extra(e)
      if missing is None:
        raise
      fail(prog, str(missing))
    except Exception as e:  # pylint: disable=broad-except  (only storage errors are handled)
      message = describe_storage_error(e)
      if message is None:
        raise
      fail(prog, message)
  return guarded


def describe_config_file_error(value: str, error: BaseException) -> str:
  """The line for a config file that cannot be executed: the error and where in the file."""
  path = os.path.abspath(value.split(":", 1)[0])
  chain = _chain(error)[::-1]   # Innermost first: ml_collections wraps the file's own error.

  def in_file(e):
    return [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]

  error = next((e for e in chain if isinstance(e, SyntaxError) or in_file(e)), chain[0])
  if isinstance(error, SyntaxError):
    message, line, text = error.msg, error.lineno, error.text or ""
  else:
    frames = in_file(error)
    detail = error.args[0] if len(error.args) == 1 else error   # ml_collections: a KeyError
    detail = detail.args[0] if isinstance(detail, KeyError) and detail.args else detail
    message, line, text = "; ".join(str(detail).splitlines()), (
        frames[-1].lineno if frames else None), frames[-1].line if frames else ""
  where = f" ({value.split(':', 1)[0]}, line {line}: {text.strip()})" if line else ""
  return f"--config={value}: loading the config raised {type(error).__name__}: {message}{where}"


def _config_file_error(argv: Sequence[str], config_flag: str) -> str | None:
  """The line for a config file that fails on its own, without any override (else None)."""
  value = flag_value(argv, config_flag)
  if value is None:
    return None
  path = value.split(":", 1)[0]
  if not os.path.isfile(path):
    return None   # Reported as a missing file.
  try:
    flags.FLAGS[config_flag].parser.parse(value)
  except Exception as e:  # pylint: disable=broad-except  (anything the user's file raises)
    return describe_config_file_error(value, e)
  return None


def flag_value(argv: Sequence[str], name: str) -> str | None:
  """`--name`'s value in argv, read before absl parses it (the last one counts, as absl's;
  None if absent)."""
  value = None
  for i, arg in enumerate(argv):
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        value = arg[len(prefix):]
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def override_keys(argv: Sequence[str], name: str) -> list[str]:
  """'train.batch_size' of every `--config.train.batch_size=...` in argv."""
  keys = []
  for arg in argv:
    flag = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and flag.startswith(name + "."):
      keys.append(flag[len(name) + 1:])
    elif arg.startswith("-") and flag.startswith(f"no{name}."):   # --noconfig.x.flag
      keys.append(flag[len(name) + 3:])
  return keys


def describe_flag_error(error: Exception, argv: Sequence[str], config_flag: str | None) -> str:
  """The one line a user reads for an error raised while parsing `argv`."""
  if isinstance(error, (KeyError, AttributeError)) and config_flag:
    # An override of a key the config does not declare: name the close ones.
    config = flags.FLAGS[config_flag].parser.parse(flag_value(argv, config_flag))
    config_lib.check_overrides(config, override_keys(argv, config_flag), flag=config_flag)
    raise error   # Not an unknown key: a bug, whose traceback helps.
  if isinstance(error, OSError) and config_flag:
    path = (flag_value(argv, config_flag) or "").split(":", 1)[0]
    reason = "no such file" if not os.path.exists(path) else str(_innermost(error)).splitlines()[0]
    return f"--{config_flag}={path}: cannot load the config file ({reason})"
  message = str(error)
  if "Traceback (most recent call last)" in message:   # The config file's get_config raised.
    head = message.split("Error whilst parsing config file")[0].rstrip(": \n")
    return f"{head}: {_innermost(error)}"
  return message


def parse_flags(prog: str, config_flag: Any = None) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `app.run`; `config_flag` is the holder of a config-file flag."""
  name = config_flag.name if config_flag is not None else None

  def parser(argv: list[str]) -> list[str]:
    try:
      rest = flags.FLAGS(argv)
      if config_flag is not None:
        config_flag.value.get   # A config file that could not be read raises on first use.
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless a user's error)
      message = _config_file_error(argv, name) if name else None
      if message is None:
        if not isinstance(e, (flags.Error, KeyError, AttributeError, OSError)):
          raise
        try:
          message = describe_flag_error(e, argv, name)
        except ValueError as described:
          message = str(described)
      fail(prog, message)
    if len(rest) > 1:
      fail(prog, f"unexpected arguments {rest[1:]}: every setting is a flag, "
                 f"--name=value (--helpshort lists them)")
    return rest
  return parser


def run(main: Callable[[list[str]], Any], prog: str, config_flag: Any = None) -> None:
  """`app.run(main)` with the parser above and `guard`."""
  app.run(guard(main, prog), flags_parser=parse_flags(prog, config_flag))
