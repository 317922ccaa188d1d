"""The test GCS server honours what the product relies on: generation
preconditions (the workdir lock) and gcsfs/TensorStore reach it."""
import pytest

storage = pytest.importorskip("google.cloud.storage")
from google.api_core import exceptions  # noqa: E402


def _client():
  from google.auth.credentials import AnonymousCredentials
  return storage.Client(project="test", credentials=AnonymousCredentials())


def test_upload_if_generation_match_zero_refuses_existing(gcs_bucket):
  blob = _client().bucket(gcs_bucket[5:]).blob("precondition/create")
  blob.upload_from_string(b"first", if_generation_match=0)
  with pytest.raises(exceptions.PreconditionFailed):
    blob.upload_from_string(b"second", if_generation_match=0)
  assert blob.download_as_bytes() == b"first"


def test_upload_if_generation_match_stale_refused(gcs_bucket):
  blob = _client().bucket(gcs_bucket[5:]).blob("precondition/replace")
  blob.upload_from_string(b"v1")
  blob.reload()
  old = blob.generation
  blob.upload_from_string(b"v2", if_generation_match=old)
  blob.reload()
  assert blob.generation != old
  with pytest.raises(exceptions.PreconditionFailed):
    blob.upload_from_string(b"v3", if_generation_match=old)
  assert blob.download_as_bytes() == b"v2"


def test_delete_if_generation_match_is_ignored(gcs_bucket):
  """Measured: fake-gcs-server deletes despite a stale `ifGenerationMatch`
  (real GCS answers 412). A lock test on this server proves nothing about
  conditional deletes; only conditional uploads are checked for real."""
  blob = _client().bucket(gcs_bucket[5:]).blob("precondition/delete")
  blob.upload_from_string(b"v1")
  blob.reload()
  old = blob.generation
  blob.upload_from_string(b"v2")
  blob.delete(if_generation_match=old)
  assert not blob.exists()


def test_epath_reaches_server(gcs_bucket):
  from etils import epath
  path = epath.Path(gcs_bucket) / "epath" / "hello.txt"
  path.write_text("hi")
  assert path.read_text() == "hi"
  assert [p.name for p in (epath.Path(gcs_bucket) / "epath").iterdir()] == ["hello.txt"]


def test_move_tree_on_bucket(gcs_bucket):
  """A damaged step is moved aside on a bucket, where mkdir makes nothing."""
  from etils import epath
  from nda_jax import workdir as workdir_lib
  root = epath.Path(gcs_bucket) / "move"
  files = {"state/a": "1", "state/sub/b": "2", "data/c.json": "3"}
  for name, text in files.items():
    (root / "checkpoints" / "7" / name).write_text(text)
  destination = root / "checkpoints_damaged" / "7"
  workdir_lib.move_tree(root / "checkpoints" / "7", destination)
  assert not (root / "checkpoints" / "7").exists()
  assert {str(p.relative_to(destination)): p.read_text()
          for p in workdir_lib.files(destination)} == files
