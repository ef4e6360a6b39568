"""The Colab notebooks: committed without outputs, and executed end to end on small settings."""

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / 'notebooks').glob('*.ipynb'))


def test_notebooks_exist():
  assert NOTEBOOKS, 'notebooks/ holds no .ipynb file'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'a cell of {path.name} has outputs: clear them before committing'
      assert cell.execution_count is None


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_runs_end_to_end_on_small_settings(path, tmp_path, monkeypatch):
  """Every cell runs (the notebooks assert their own results) in a fresh kernel."""
  monkeypatch.setenv('OPTAX_SAM_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
  printed = ''.join(
    output.get('text', '')
    for cell in notebook.cells
    if cell.cell_type == 'code'
    for output in cell.outputs
  )
  assert 'optax_sam' in printed and 'Traceback' not in printed
