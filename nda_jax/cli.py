"""What every command shares: a user's mistake ends in one line that says what to do.

`run(main, prog)` is absl's `app.run` with a flag parser that turns each
parsing error (an unknown `--config.<key>`, naming the close ones; a value of
the wrong type; a config file that cannot be loaded) into
`<prog>: error: <message>` on stderr and exit status 1, without a traceback.
A command's `main` reports its own user errors with `fail`.
"""
from collections.abc import Callable, Sequence
import os
import sys
from typing import Any, NoReturn

from absl import app
from absl import flags

from nda_jax import config_lib


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


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_keys(argv: Sequence[str], name: str) -> list[str]:
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
    config = flags.FLAGS[config_flag].parser.parse(_flag_value(argv, config_flag))
    config_lib.check_overrides(config, _override_keys(argv, config_flag), flag=config_flag)
    raise error   # Not an unknown key: a bug, whose traceback helps.
  if isinstance(error, OSError) and config_flag:
    path = (_flag_value(argv, config_flag) or "").split(":", 1)[0]
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
    except (flags.Error, KeyError, AttributeError, OSError) as e:
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
  """`app.run(main)` with the parser above."""
  app.run(main, flags_parser=parse_flags(prog, config_flag))
