"""Executes the notebooks at their full settings and stores the executed copies the site renders.

  python docs/execute_notebooks.py            # every notebook in notebooks/ (minutes each)
  python docs/execute_notebooks.py 01_quickstart

The notebooks in ``notebooks/`` stay without outputs (Colab opens them from there); the site shows
the copies written to ``docs/executed_notebooks/``, with the outputs of a full run and, in their
metadata, when and where it ran. ``tests/integration/test_notebooks.py`` checks that every copy
has the cells of its notebook, so a changed notebook fails CI until it is executed again.
"""

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / 'notebooks'
EXECUTED = ROOT / 'docs' / 'executed_notebooks'


def execute(path: pathlib.Path, out: pathlib.Path) -> float:
  """Runs ``path`` in a fresh kernel at full settings and writes it with its outputs to ``out``."""
  notebook = nbformat.read(path, as_version=4)
  env = {k: v for k, v in os.environ.items() if k != 'OPTAX_SAM_NOTEBOOK_QUICK'}
  env['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  os.environ.clear()
  os.environ.update(env)
  began = time.perf_counter()
  client = nbclient.NotebookClient(
    notebook, timeout=1800, kernel_name='python3', resources={'metadata': {'path': str(out.parent)}}
  )
  client.execute()
  seconds = time.perf_counter() - began
  import jax  # noqa: PLC0415 - only for the record of where it ran

  notebook.metadata['optax_sam'] = {
    'executed': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    'settings': 'full',
    'seconds': round(seconds, 1),
    'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}',
  }
  nbformat.write(notebook, out)
  return seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('names', nargs='*', help='notebook names without .ipynb (default: all)')
  args = parser.parse_args(argv)
  paths = sorted(NOTEBOOKS.glob('*.ipynb'))
  if args.names:
    paths = [p for p in paths if p.stem in args.names]
  EXECUTED.mkdir(exist_ok=True)
  for path in paths:
    print(f'executing {path.name} at full settings ...', flush=True)
    seconds = execute(path, EXECUTED / path.name)
    print(f'wrote {EXECUTED / path.name} ({seconds:.0f} s)', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
