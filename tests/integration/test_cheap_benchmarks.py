"""The cheaper-SAM benchmark and study in quick mode: structure and exact memory, no timing."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import cheap, cheap_study, harness, models

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
  out = tmp_path_factory.mktemp('cheap')
  report = cheap.main(['--quick', '--models', 'mlp', '--out', str(out)])
  return report, json.loads((out / 'cheap.json').read_text()), (out / 'cheap.md').read_text()


def test_state_bytes_are_exactly_what_design_says(bench):
  _, data, _ = bench
  (model,) = data['models']
  p = model['param_bytes']
  params, _ = models.mlp(width=32, in_dim=64, batch_size=8).init(jax.random.key(0))
  assert p == models.param_bytes(params)
  deltas = {name: c['argument_delta_bytes'] for name, c in model['cases'].items()}
  assert deltas == {
    'base': 0,
    'sam': 0,
    'when/plain': 4,
    'when/every(5)': 4,
    'look_sam(k=5)': p + 4,
    'momentum_sam': 4,
    'base+norm(v)': 4,
  }


def test_report_lists_every_target(bench):
  report, data, markdown = bench
  checks = report['checks']
  for name in cheap.TARGETS:
    assert any(f' {name}: time ' in line for line in checks)
    assert f'| {name} |' in markdown
  assert all(line.startswith('PASS') for line in checks if ': state ' in line)
  assert data['environment']['versions']['jax']


def test_study_quick_mode_end_to_end(tmp_path):
  assert cheap_study.main(['--quick', '--out', str(tmp_path)]) == 0
  data = json.loads((tmp_path / 'cheap_study.json').read_text())
  variants = ['sgd', 'sam', 'sam every(2)', 'momentum_sam rho=0.3']
  assert len(data['runs']) == 2 * 2 * len(variants)  # noise levels x seeds x variants
  assert set(data['table']) == {'0.0', '0.2'}
  for rows in data['table'].values():
    assert list(rows) == variants
    assert rows['sgd']['time_vs_sgd'] == 1.0
    assert rows['sam']['second_gradients'] == 1.0 and rows['sgd']['second_gradients'] == 0.0
    assert rows['sam every(2)']['second_gradients'] == 0.5
    for row in rows.values():
      assert 0.0 <= row['mean'] <= 1.0
  text = (tmp_path / 'cheap_study.md').read_text()
  assert text.count('| variant |') == 2 and '| momentum_sam rho=0.3 |' in text


def test_momentum_norm_keeps_the_base_updates_and_the_norm_of_the_new_momentum():
  base = optax.sgd(0.1, momentum=0.9)
  tx = cheap.momentum_norm(base)
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
  grads = {'w': jnp.full((2, 3), 0.5), 'b': jnp.array([1.0, -2.0, 3.0])}
  state, base_state = tx.init(params), base.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    expected, base_state = base.update(grads, base_state, params)
    jax.tree.map(np.testing.assert_array_equal, updates, expected)
  trace = base_state[0].trace  # after two steps: g + 0.9 g
  np.testing.assert_allclose(
    state.norm, np.sqrt(sum(np.sum(np.square(t)) for t in jax.tree.leaves(trace))), rtol=1e-6
  )
  np.testing.assert_allclose(state.norm, 1.9 * float(optax.tree.norm(grads)), rtol=1e-6)


def test_side_settings_apply_the_budget():
  parse = lambda *argv: harness.side_settings(harness.side_arguments('doc', 'out', list(argv)))
  assert parse().budget_s == harness.FULL.budget_s
  assert parse('--budget', '7').budget_s == 7.0
  assert parse('--quick') == harness.QUICK


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python: the probe passes, benchmarks.cheap writes its two files, the rest fails.
if [[ $1 == -c ]]; then echo "3.12.0 jax 0 optax 0 stub []"; exit 0; fi
if [[ "$1 $2" == "-m benchmarks.cheap" ]]; then
  out=${@: -1}; mkdir -p "$out"; echo '{}' > "$out/cheap.json"; echo '|' > "$out/cheap.md"; exit 0
fi
echo "stub: $*"; exit 3
"""


def test_gpu_checks_script_names_what_exists_and_rejects_an_unknown_part(tmp_path):
  script = ROOT / 'benchmarks' / 'gpu_checks.sh'
  text = script.read_text()
  subprocess.run(['bash', '-n', str(script)], check=True)
  for path in re.findall(r'tests/test_\w+\.py', text):
    assert (ROOT / path).is_file(), path
  for module in set(re.findall(r'-m (benchmarks\.\w+)', text)):
    assert (ROOT / (module.replace('.', '/') + '.py')).is_file(), module
  out = tmp_path / 'out'
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
  done = subprocess.run(['bash', str(script), 'nonsense'], env=env, capture_output=True, text=True)
  assert done.returncode == 2, done.stdout + done.stderr
  log = (out / 'gpu_checks.log').read_text()
  assert 'unknown part: nonsense (cheap, tests, contract, run, micro, parallel, lm)' in log
  assert 'jax ' + jax.__version__ in log
  env['PYTHON'] = 'false'  # an interpreter that cannot import JAX: nothing runs
  done = subprocess.run(['bash', str(script), 'cheap'], env=env, capture_output=True, text=True)
  assert done.returncode == 1 and 'nothing checked' in done.stdout


def test_gpu_checks_script_runs_each_part_and_keeps_the_worst_status(tmp_path):
  stub = tmp_path / 'python'
  stub.write_text(STUB_PYTHON)
  stub.chmod(0o755)
  out = tmp_path / 'out'
  env = dict(os.environ, OUT=str(out), PYTHON=str(stub))
  script = ROOT / 'benchmarks' / 'gpu_checks.sh'
  done = subprocess.run(['bash', str(script)], env=env, capture_output=True, text=True)
  assert done.returncode == 1, done.stdout + done.stderr  # the tests part failed
  assert sorted(p.name for p in out.iterdir()) == [
    'cheap-resnet18.json',
    'cheap-resnet18.md',
    'cheap-small.json',
    'cheap-small.md',
    'gpu_checks.log',
  ]
  log = (out / 'gpu_checks.log').read_text()
  for line in ('== cheap-small: exit 0', '== cheap-resnet18: exit 0', '== tests: exit 3'):
    assert line in log
  assert 'stub: -m pytest -q -n 0 tests/test_when.py' in log
  done = subprocess.run(['bash', str(script), 'tests', 'nonsense', 'cheap'], env=env, text=True)
  assert done.returncode == 2  # an unknown part outranks a failed one, in any order
