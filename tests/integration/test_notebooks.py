"""The Colab notebooks: committed without outputs, badge and install cell pointing at the
repository named in pyproject.toml, and executed end to end on small settings."""

import builtins
import os
import pathlib
import re
import subprocess
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
  install = second.source
  assert 'import optax_sam' in install and 'except ImportError' in install
  # The released package first, then the repository's main branch (what each does: below).
  released, repository = "'optax_sam[examples]'", f"'optax_sam[examples] @ git+{repo}'"
  assert released in install and repository in install
  assert install.index(released) < install.index(repository)
  assert f'in a clone of {repo} run ' in install and "pip install -e '.[examples]'" in install
  # No other cell installs anything or names another repository.
  for cell in notebook.cells[2:]:
    assert 'pip install' not in cell.source or cell.cell_type == 'markdown'
    assert 'git+' not in cell.source


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
@pytest.mark.parametrize('succeeds', [0, 1, None], ids=['released', 'repository', 'neither'])
def test_install_cell_tries_release_then_repository_then_says_how(path, succeeds, monkeypatch):
  """Where optax_sam is missing, the install cell runs pip for the released package, then for the
  repository, stopping at the first that succeeds; if neither does, it prints one line saying how
  to install from a clone. pip and the import are faked: nothing is installed."""
  repo = repository_url()
  source = nbformat.read(path, as_version=4).cells[1].source
  commands, printed = [], []
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == 'optax_sam' and succeeds not in range(len(commands)):
      raise ImportError(f'No module named {name!r}')
    return real_import(name, *args, **kwargs)

  def fake_run(command, **kwargs):
    commands.append(command)
    return subprocess.CompletedProcess(command, 0 if len(commands) - 1 == succeeds else 1)

  monkeypatch.setattr(subprocess, 'run', fake_run)
  monkeypatch.setattr(builtins, '__import__', fake_import)
  try:
    exec(compile(source, path.name, 'exec'), {'print': lambda *a: printed.append(' '.join(a))})
  finally:
    monkeypatch.undo()
  pip = [sys.executable, '-m', 'pip', 'install', '-q']
  expected = [pip + ['optax_sam[examples]'], pip + [f'optax_sam[examples] @ git+{repo}']]
  assert commands == expected[: 2 if succeeds is None else succeeds + 1]
  if succeeds is None:
    assert len(printed) == 1 and '\n' not in printed[0]
    assert f"in a clone of {repo} run pip install -e '.[examples]'" in printed[0]
    assert 'restart the kernel' in printed[0]
  else:
    assert printed == []


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


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_the_site_renders_an_executed_copy_with_the_same_cells(path):
  """docs/executed_notebooks/ holds each notebook run at full settings (docs/execute_notebooks.py):
  its cells must be the notebook's, so that a changed notebook is executed again before it lands."""
  executed_path = ROOT / 'docs' / 'executed_notebooks' / path.name
  assert executed_path.exists(), f'run: python docs/execute_notebooks.py {path.stem}'
  notebook = nbformat.read(path, as_version=4)
  executed = nbformat.read(executed_path, as_version=4)
  source = lambda nb: [(c.cell_type, c.source) for c in nb.cells]
  stale = f'stale: python docs/execute_notebooks.py {path.stem}'
  assert source(executed) == source(notebook), stale
  assert executed.metadata['optax_sam']['settings'] == 'full'
  outputs = [o for c in executed.cells if c.cell_type == 'code' for o in c.outputs]
  assert outputs and not [o for o in outputs if o.output_type == 'error']
