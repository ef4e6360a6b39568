"""The API reference lists every public name: each public module has a page, each name an entry.

Read from the sources (``ast``), so this runs without Flax installed and without building the site
(CI builds it separately, with warnings as errors).
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'optax_sam'
API = ROOT / 'docs' / 'api'
NOT_PUBLIC = {'_src', 'examples'}  # the examples are documented in docs/example.md


def public_modules():
  """``{dotted name: source file}`` of optax_sam and its public submodules and subpackages."""
  modules = {'optax_sam': PACKAGE / '__init__.py'}
  for path in sorted(PACKAGE.iterdir()):
    name = path.stem if path.suffix == '.py' else path.name
    if name.startswith('_') or name in NOT_PUBLIC:
      continue
    if path.suffix == '.py':
      modules[f'optax_sam.{name}'] = path
    elif (path / '__init__.py').exists():
      modules[f'optax_sam.{name}'] = path / '__init__.py'
  return modules


def dunder_all(path):
  """The names in the literal ``__all__`` of a module's source."""
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == '__all__' for t in node.targets
    ):
      return set(ast.literal_eval(node.value))
  raise AssertionError(f'{path} has no literal __all__')


def documented():
  """``{module: names}`` from the autosummary lists of docs/api/*.rst, by their currentmodule."""
  entries = {}
  for page in sorted(API.glob('*.rst')):
    module, in_autosummary = None, False
    for line in page.read_text().splitlines():
      if m := re.match(r'\.\. currentmodule:: (\S+)', line):
        module = m.group(1)
      if line.startswith('.. '):
        in_autosummary = line.startswith('.. autosummary::')
      elif in_autosummary and (m := re.fullmatch(r'   ([A-Za-z_]\w*)', line)):
        assert module, f'{page.name}: an autosummary entry before any currentmodule'
        entries.setdefault(module, set()).add(m.group(1))
  return entries


def test_the_public_modules_are_found():
  assert {'optax_sam', 'optax_sam.flax'} <= set(public_modules())


@pytest.mark.parametrize('module', sorted(public_modules()))
def test_every_public_name_is_in_the_api_reference(module):
  names = dunder_all(public_modules()[module])
  listed = documented().get(module, set())
  missing = sorted(names - listed)
  assert not missing, (
    f'{module}: {missing} not in the API reference; list them in an autosummary of docs/api/ '
    f'(a new module gets a page there and a line in docs/api/index.md)'
  )
  assert listed <= names, f'{module}: documented but not public: {sorted(listed - names)}'


def test_every_api_page_is_in_the_toctree():
  index = (API / 'index.md').read_text()
  toctree = re.search(r'```\{toctree\}\n(.*?)```', index, flags=re.S).group(1).splitlines()
  entries = [line.strip() for line in toctree if line.strip() and not line.startswith(':')]
  assert sorted(p.stem for p in API.glob('*.rst')) == sorted(entries)
