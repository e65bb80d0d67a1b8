"""examples/finetune.ipynb runs top to bottom (the tiny stand-in model: no quickstart here), from
the examples/ directory as Jupyter starts it, working in the repository's root."""

import os
import shutil

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT


def test_finetune_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "examples/finetune.ipynb", as_version=4)
    (tmp_path / "recipes").mkdir()  # a checkout's root: recipes/ beside examples/
    shutil.copy(ROOT / "recipes/quickstart.yaml", tmp_path / "recipes/quickstart.yaml")
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples/finetune.ipynb", tmp_path / "examples/finetune.ipynb")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    start = tmp_path / "examples"
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": start}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
    )
    assert "The number of items." in outputs
    assert (tmp_path / "out/notebook/hf-finetuned/config.json").is_file()
    assert os.listdir(tmp_path / "out/notebook/hf-finetuned")
    assert not (start / "out").exists()  # not beside the notebook
