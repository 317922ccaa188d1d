"""tests/toy_main.py (nda_jax.main with the toy method) in a subprocess, its log read as it runs."""
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def run(workdir, *flags, devices=2, wait_for=None, send=None, timeout=240):
  """Runs main to its end: (return code, output).

  With `wait_for`, signal `send` goes to it once the progress line of that step
  is printed; with `send=None` the still running process and the lines read so
  far are returned instead.
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, os.path.join(TESTS, "toy_main.py"), f"--workdir={workdir}", *flags]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=os.path.dirname(TESTS))
  lines = []
  try:
    if wait_for is not None:
      for line in proc.stdout:
        lines.append(line)
        if f"step {wait_for}/" in line:
          if send is None:
            return proc, "".join(lines)
          proc.send_signal(send)
          break
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return proc.returncode, "".join(lines) + out
