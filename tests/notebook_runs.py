"""Runs a notebook of notebooks/ as a user would (a real Jupyter kernel)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(name: str) -> list:
  """Executes notebooks/<name> in its folder; the outputs of its code cells, in order."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, "notebooks", name)
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
