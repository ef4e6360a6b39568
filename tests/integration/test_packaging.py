"""Packaging: the wheel and the sdist build, pass ``twine check``, and the wheel installs and works.

One build for the module (``python -m build``, about half a minute); the wheel is installed with
``--no-deps`` into a fresh virtual environment that sees this one's packages
(through a ``.pth`` file: jax, optax), and imported from outside the source tree.
"""

import pathlib
import re
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip('tomllib')  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())


def _run(*args, cwd=None):
  return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope='module')
def dist(tmp_path_factory):
  out = tmp_path_factory.mktemp('dist')
  _run(sys.executable, '-m', 'build', '--sdist', '--wheel', '--outdir', str(out), str(ROOT))
  (wheel,) = out.glob('*.whl')
  (sdist,) = out.glob('*.tar.gz')
  return wheel, sdist


def test_twine_check_passes(dist):
  report = _run(sys.executable, '-m', 'twine', 'check', '--strict', *map(str, dist))
  assert report.count('PASSED') == 2, report


def test_the_wheel_holds_the_package_its_type_marker_and_the_urls(dist):
  wheel, _ = dist
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = archive.read(next(n for n in names if n.endswith('.dist-info/METADATA')))
  assert 'optax_sam/py.typed' in names
  assert 'optax_sam/_src/sharpness_aware.py' in names
  for module in ('main', 'train', 'checkpoints'):  # python -m optax_sam.examples.main (or .train)
    assert f'optax_sam/examples/{module}.py' in names
  assert not [n for n in names if n.startswith(('tests/', 'benchmarks/', 'docs/', 'notebooks/'))]
  text = metadata.decode()
  urls = dict(re.findall(r'^Project-URL: ([^,]+), (\S+)$', text, flags=re.M))
  assert urls == PYPROJECT['project']['urls']
  version = re.search(r'^Version: (\S+)$', text, flags=re.M).group(1)
  init = (ROOT / 'optax_sam' / '__init__.py').read_text()
  assert f"__version__ = '{version}'" in init


def test_the_sdist_holds_the_sources_and_the_type_marker(dist):
  _, sdist = dist
  with tarfile.open(sdist) as archive:
    names = archive.getnames()
  top = names[0].split('/')[0]
  for path in ('pyproject.toml', 'README.md', 'optax_sam/py.typed', 'optax_sam/__init__.py'):
    assert f'{top}/{path}' in names


def test_the_installed_wheel_imports_and_steps_outside_the_source_tree(dist, tmp_path):
  wheel, _ = dist
  env = tmp_path / 'env'
  venv.EnvBuilder(with_pip=True).create(env)
  python = env / 'bin' / 'python'
  # This environment's packages (jax, optax) after the new one's own: a .pth line appends a
  # directory to sys.path without running the .pth files in it (an editable optax_sam's finder).
  own = _run(str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ours = [p for p in sys.path if p.endswith('site-packages')]
  (pathlib.Path(own.strip()) / 'outer_environment.pth').write_text('\n'.join(ours) + '\n')
  _run(str(python), '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', str(wheel))
  script = (
    'import jax.numpy as jnp, optax, optax_sam\n'
    'print(optax_sam.__file__)\n'
    'tx = optax_sam.sam(optax.sgd(1.0), rho=0.5)\n'
    'w = jnp.array([3.0, 4.0])\n'
    'u, _ = tx.update(w, tx.init(w), w, grad_fn=lambda p: 2 * p)\n'
    'print(float(optax.apply_updates(w, u)[0]))\n'
  )
  out = _run(str(python), '-I', '-c', script, cwd=tmp_path).split()
  assert pathlib.Path(out[0]).is_relative_to(env), out[0]  # the wheel, not this checkout
  # e = 0.5 g / |g| = [0.3, 0.4]; w - 2 (w + e) = -w - 2 e, first entry -3.6
  assert float(out[1]) == pytest.approx(-3.6)


def test_readme_links_the_documentation_address_of_pyproject():
  """The docs address is written in [project.urls]; the README states the same one."""
  assert PYPROJECT['project']['urls']['Documentation'] in (ROOT / 'README.md').read_text()
