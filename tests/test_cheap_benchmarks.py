"""The cheaper-SAM benchmark and study in quick mode: structure and exact memory, no timing."""

import json

import jax
import pytest

from benchmarks import cheap, cheap_study, models


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
