"""The label-noise benchmark end to end: ``--smoke``, ``--resume`` and ``--report`` in a subprocess.

Checks the structure and value ranges of what the benchmark writes, never its accuracies.
"""

import doctest
import json
import math
import pathlib
import subprocess
import sys

import pytest

from benchmarks import label_noise
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUN_KEYS = {
  'optimizer', 'label', 'rho', 'm', 'noise', 'seed', 'epochs', 'final_test_accuracy',
  'peak_test_accuracy', 'peak_epoch', 'selected_test_accuracy', 'selected_epoch',
  'final_val_accuracy', 'train_accuracy', 'noisy_train_accuracy', 'ece', 'top_eigenvalue',
  'gradient_evaluations', 'seconds', 'curves',
}  # fmt: skip
FRACTIONS = (
  'final_test_accuracy',
  'peak_test_accuracy',
  'selected_test_accuracy',
  'final_val_accuracy',
  'train_accuracy',
  'ece',
)


def _run(*args: str) -> subprocess.CompletedProcess:
  command = [sys.executable, '-m', 'benchmarks.label_noise', *args]
  env = helpers.child_environment()  # one device, conftest's compile flags and cache
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  return done


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """``python -m benchmarks.label_noise --smoke`` as a user runs it: its own process."""
  out = tmp_path_factory.mktemp('label_noise')
  done = _run('--smoke', '--out', str(out))
  assert 'Paired differences against SGD' in done.stdout  # it prints the tables it writes
  return out


def test_smoke_json_schema_and_ranges(smoke):
  data = json.loads((smoke / 'label_noise.json').read_text())
  setting = label_noise.smoke_setting()
  assert data['setting'] == setting.to_dict()
  specs = [label_noise.parse_spec(o) for o in setting.optimizers]
  variants = [label_noise.parse_spec(o) for o in setting.variants]
  groups = len(specs) * len(setting.noise) + len(variants)
  assert len(data['runs']) == groups * len(setting.seeds)
  steps = (4000 - setting.validation) // setting.batch_size * setting.epochs
  for run in data['runs']:
    assert set(run) >= RUN_KEYS, RUN_KEYS - set(run)
    spec = label_noise.Spec(run['optimizer'], run['rho'], run['m'])
    assert spec in specs + variants and run['label'] == spec.label
    assert run['noise'] in setting.noise and run['seed'] in setting.seeds
    assert run['epochs'] == setting.epochs
    for key in FRACTIONS:
      assert 0.0 <= run[key] <= 1.0, (key, run[key])
    if run['noise']:
      assert 0.0 <= run['noisy_train_accuracy'] <= 1.0
    else:
      assert run['noisy_train_accuracy'] is None  # no wrong label to fit
    peak = run['peak_test_accuracy']
    assert peak >= run['final_test_accuracy'] and peak >= run['selected_test_accuracy']
    assert 1 <= run['peak_epoch'] <= run['epochs'] and 1 <= run['selected_epoch'] <= run['epochs']
    assert math.isfinite(run['top_eigenvalue']) and run['seconds'] > 0
    sam_steps = 2 if spec.name != 'sgd' else 1
    assert run['gradient_evaluations'] == sam_steps * steps
    assert set(run['curves']) == {
      'test_accuracy', 'val_accuracy', 'train_accuracy', 'noisy_train_accuracy'
    }  # fmt: skip
    for curve in run['curves'].values():
      assert len(curve) == run['epochs'] and all(0.0 <= v <= 1.0 for v in curve)
    assert run['curves']['test_accuracy'][-1] == pytest.approx(run['final_test_accuracy'], abs=1e-4)
  assert {r['m'] for r in data['runs']} == {None, 32}
  summary = data['summary']
  assert list(summary) == ['0', '0.4']
  assert summary['0.4']['reference_sam'] == 'sam rho=0.1'
  rows = summary['0.4']['rows']
  assert list(rows) == ['sgd', 'sam rho=0.1', 'sam rho=0.1 m=32']
  assert rows['sam rho=0.1']['vs_sgd']['final_test_accuracy']['n'] == 2
  assert rows['sam rho=0.1 m=32']['vs_sam']['final_test_accuracy']['verdict'] in (
    'higher',
    'lower',
    'no difference',
  )
  for name in ('label_noise.md', 'noise.png', 'epochs.png'):
    assert (smoke / name).stat().st_size > 0


def test_resume_trains_nothing_and_report_rerenders(smoke):
  before = json.loads((smoke / 'label_noise.json').read_text())
  done = _run('--smoke', '--resume', '--out', str(smoke))
  assert 'group' not in done.stdout  # every run was there: no group trained
  after = json.loads((smoke / 'label_noise.json').read_text())
  assert after['runs'] == before['runs']
  (smoke / 'label_noise.md').unlink()
  (smoke / 'noise.png').unlink()
  done = _run('--report', '--out', str(smoke))
  assert (smoke / 'label_noise.md').read_text() in done.stdout
  assert (smoke / 'noise.png').stat().st_size > 0


def test_bad_options_and_docstring_examples(tmp_path):
  with pytest.raises(ValueError, match='unknown optimizer'):
    label_noise.parse_spec('adam')
  with pytest.raises(ValueError, match='whole batch'):
    label_noise.parse_spec('looksam:0.1:8')
  assert label_noise.main(['--report', '--out', str(tmp_path)]) == 1  # no JSON there
  assert doctest.testmod(label_noise).failed == 0


def test_each_seed_draws_its_own_optimizer_noise():
  """m-RWP's (and bSAM's) PRNG key in the state comes from the run's key, not the alias's seed."""
  import jax
  import numpy as np
  import optax

  setting = label_noise.Setting()
  params = label_noise.init_params(jax.random.key(0), 4)
  state = label_noise.make_optimizer(label_noise.parse_spec('mrwp:0.05'), setting, 10).init(params)
  runs = [label_noise.own_keys(state, jax.random.key(seed)) for seed in (0, 1)]
  keys = [optax.tree_utils.tree_get(run, 'key') for run in (state, *runs)]
  assert len({tuple(np.asarray(k).tolist()) for k in keys}) == 3  # the alias's, seed 0's, seed 1's
  for run in runs:  # nothing else changes
    rest = lambda s: optax.tree_utils.tree_set(s, key=np.zeros(2, np.uint32))  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, rest(run), rest(state))
  sgd = label_noise.make_optimizer(label_noise.parse_spec('sgd'), setting, 10).init(params)
  assert label_noise.own_keys(sgd, jax.random.key(0)) is sgd  # no key, nothing to change
