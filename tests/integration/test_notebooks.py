"""The Colab notebooks: committed without outputs, badge and install cell pointing at the
repository named in pyproject.toml, and executed end to end on small settings."""

import os
import pathlib
import re
import sys

import nbclient
import nbformat
import pytest

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  tomllib = pytest.importorskip('tomli')

ROOT = pathlib.Path(__file__).parents[2]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
BADGE = re.compile(
  r'\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]\(([^)]+)\)'
)


def repository_url() -> str:
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)['project']['urls']['Repository']


def test_notebooks_exist():
  names = {path.name for path in NOTEBOOKS}
  assert {'01_quickstart.ipynb', '02_friendly_sam.ipynb', '03_stable_sam.ipynb'} <= names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'a cell of {path.name} has outputs: clear them before committing'
      assert cell.execution_count is None


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_title_badge_and_install_cell(path):
  """A title, a Colab badge naming this file in the repository, then a Colab-ready install."""
  repo = repository_url()
  assert repo.startswith('https://github.com/'), repo
  notebook = nbformat.read(path, as_version=4)
  first, second = notebook.cells[0], notebook.cells[1]
  assert first.cell_type == 'markdown' and first.source.startswith('# ')
  links = BADGE.findall(first.source)
  expected = (
    'https://colab.research.google.com/github/'
    + repo.removeprefix('https://github.com/')
    + f'/blob/main/notebooks/{path.name}'
  )
  assert links == [expected]
  assert second.cell_type == 'code'
  assert 'import optax_sam' in second.source and 'except ImportError' in second.source
  assert f'%pip install -q "optax_sam[examples] @ git+{repo}"' in second.source
  # No other cell installs anything or names another repository.
  for cell in notebook.cells[2:]:
    assert 'pip install' not in cell.source or cell.cell_type == 'markdown'
    assert 'git+' not in cell.source


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_runs_end_to_end_on_small_settings(path, tmp_path, monkeypatch):
  """Every cell runs (the notebooks assert their own results) in a fresh kernel."""
  monkeypatch.setenv('OPTAX_SAM_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  # The kernel imports this checkout's optax_sam, so the install cell never reaches the network.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
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
  assert 'Successfully installed' not in printed  # the install cell found the checkout


def test_readme_links_every_notebook():
  readme = (ROOT / 'README.md').read_text()
  for path in NOTEBOOKS:
    assert f'](notebooks/{path.name})' in readme, f'README.md does not link {path.name}'
