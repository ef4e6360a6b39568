"""Test setup for tests/ and the docstring examples, set before JAX starts.

8 fake CPU devices; fast compiles.
"""

import os
import pathlib

import pytest

# The tests compile far more than they compute. LLVM without optimization halves XLA:CPU's compile
# times (the arithmetic is the same: fast math stays off either way), and XLA:CPU's older LLVM IR
# fusion emitters compile the tests' many small programs faster than its newer MLIR fusion emitters
# (measured: tests/test_family.py and tests/test_when.py 42 s against 29 s on 1 core). The
# processes the tests start (the study, the multi-host workers) take FAST_COMPILE from here too.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count=8 {FAST_COMPILE}'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# No persistent compilation cache: with the compile flags above it saved 11 s of 369 (358 s with
# it, on 2 cores), and writing to it once crashed a pytest-xdist worker (a segmentation fault in
# JAX's executable.serialize(), which then hung the run).


INTEGRATION = pathlib.Path(__file__).parent / 'tests' / 'integration'


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
  """Parallel by default where pytest-xdist is installed: whole files per worker, at most 4.

  Whole files per worker keep module fixtures (trained runs) built once, and each worker is a
  fresh process. Without pytest-xdist (or with ``-p no:xdist``, or ``-n`` given) nothing changes.
  """
  if os.environ.get('PYTEST_XDIST_WORKER') or hasattr(config, 'workerinput'):
    return  # a worker runs its tests itself
  if config.pluginmanager.hasplugin('xdist') and config.getoption('numprocesses') is None:
    config.option.numprocesses = 'auto'
    config.option.maxprocesses = 4
    config.option.dist = 'loadfile'


def pytest_configure(config):
  config.addinivalue_line(
    'markers',
    'devices(n): needs n devices of the default backend (here 8 fake CPU devices; on a machine '
    'with fewer, such as one GPU with JAX_PLATFORMS=cuda, the test is skipped)',
  )
  config.addinivalue_line(
    'markers',
    'integration: the example, the benchmarks, the study, the notebooks and the packaging '
    '(every test under tests/integration/); -m "not integration" runs the library alone',
  )


def pytest_collection_modifyitems(config, items):
  for item in items:
    if INTEGRATION in pathlib.Path(str(item.fspath)).parents:
      item.add_marker(pytest.mark.integration)


def pytest_runtest_setup(item):
  marker = item.get_closest_marker('devices')
  if marker is not None:
    import jax  # noqa: PLC0415 - after XLA_FLAGS and JAX_PLATFORMS above are set

    if jax.device_count() < marker.args[0]:
      pytest.skip(
        f'needs {marker.args[0]} devices, {jax.default_backend()} has {jax.device_count()}'
      )
