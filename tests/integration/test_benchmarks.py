"""The benchmark script in quick mode: output structure and exact memory figures, never timing."""

import json

import pytest

from benchmarks import cases as cases_lib
from benchmarks import references, run

VARIANTS = [v.name for v in cases_lib.VARIANTS]
TWO_PHASE = [v.name for v in cases_lib.VARIANTS if v.two_phase]  # Lookbehind-SAM has none
REFERENCED = [v for v in VARIANTS if v in {**references.MATH, **references.STEPS}]  # hand-written


@pytest.fixture(scope='module')
def output(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench')
  report = run.main(['--quick', '--models', 'mlp,sweep', '--device-note', 'CI', '--out', str(out)])
  with open(out / 'benchmarks.json') as f:
    data = json.load(f)
  markdown = (out / 'benchmarks.md').read_text()
  return report, data, markdown


def _cases(model):
  return {c['name']: c for c in model['cases']}


def test_json_structure(output):
  _, data, _ = output
  env = data['environment']
  for key in ('date', 'command', 'platform', 'device', 'cpu', 'versions', 'base_optimizer'):
    assert env[key], key
  assert env['device_note'] == 'CI'
  assert env['command'].startswith('python -m benchmarks.run --quick')
  for package in ('jax', 'jaxlib', 'optax', 'optax_sam'):
    assert env['versions'][package]
  assert data['quick'] is True
  assert [m['name'] for m in data['models']] == ['mlp-w32']
  assert [m['name'] for m in data['sweep']] == ['mlp-w16', 'mlp-w64']
  summary = data['summary']
  counted = [t for m in data['models'] + data['sweep'] for t in m['targets'] if not t['diagnostic']]
  assert summary['pass'] + summary['miss'] == len(counted) > 0


def test_every_case_is_measured(output):
  _, data, _ = output
  (model,) = data['models']
  expected = ['base', 'minimal']
  expected += [f'{v}/1call' for v in VARIANTS] + [f'{v}/2phase' for v in TWO_PHASE]
  expected += ['contrib/opaque', 'contrib/transparent']
  expected += [f'ref/{v}' for v in REFERENCED]
  assert [c['name'] for c in model['cases']] == expected
  for c in model['cases']:
    assert c['time_ms'] > 0
    assert len(c['times_ms']) == model['rounds'] >= 3
    assert set(c['memory']) >= {'argument', 'output', 'alias', 'temp', 'footprint'}
    assert c['memory']['argument'] > 0 and c['memory']['temp'] >= 0
    assert c['calls_per_sam_step'] == (2 if c['mode'] in ('2phase', 'transparent') else 1)
    assert c['ratio_vs_minimal']['ci95'][0] <= c['ratio_vs_minimal']['median']
  for sweep_model in data['sweep']:
    assert set(_cases(sweep_model)) == run.QUICK_SWEEP_CASES


def test_memory_is_exact(output):
  """Argument bytes: the minimal step's plus exactly the documented state (deterministic)."""
  _, data, _ = output
  (model,) = data['models']
  by_name = _cases(model)
  p = model['param_bytes']
  assert p == 4 * model['param_count']  # float32
  arg = lambda name: by_name[name]['memory']['argument']
  # One-call mode keeps no state, except F-SAM's EMA and its int32 step count.
  for v in ('sam', 'usam', 'asam', 'stablesam', 'gsam'):
    assert arg(f'{v}/1call') == arg('minimal')
  assert arg('fsam/1call') - arg('sam/1call') == p + 4
  assert arg('fsam+stable/1call') - arg('sam/1call') == p + 4
  assert arg('sampa/1call') - arg('sam/1call') == p + 4  # SAMPa's direction d and its count
  # Two-phase mode adds the clean weights, the int32 phase and the correction's prepared value.
  assert arg('sam/2phase') - arg('sam/1call') == p + 4
  assert arg('usam/2phase') - arg('sam/1call') == p + 4
  assert arg('asam/2phase') - arg('sam/1call') == p + 4
  assert arg('stablesam/2phase') - arg('sam/1call') == p + 4 + 4  # a float32 norm
  assert arg('gsam/2phase') - arg('sam/1call') == 2 * p + 4  # a gradient copy
  assert arg('fsam/2phase') - arg('sam/1call') == 2 * p + 8
  assert arg('fsam+stable/2phase') - arg('sam/1call') == 2 * p + 12
  # optax.contrib.sam: an int32 counter, plus a weight copy in transparent mode.
  assert arg('contrib/opaque') - arg('minimal') == 4
  assert arg('contrib/transparent') - arg('minimal') == p + 4
  # The hand-written references carry the same state as the variants.
  for v in REFERENCED:
    assert arg(f'ref/{v}') == arg(f'{v}/1call')
  for c in model['cases']:
    if c['expected_state_bytes'] is not None:
      assert c['argument_delta_vs_minimal'] == c['expected_state_bytes'], c['name']
  state_targets = [t for t in model['targets'] if t['target'].startswith('memory: argument bytes')]
  assert len(state_targets) == len(VARIANTS) + len(TWO_PHASE)
  assert all(t['verdict'] == 'PASS' for t in state_targets)


def test_targets_are_reported(output):
  _, data, markdown = output
  (model,) = data['models']
  kinds = {t['target'] for t in model['targets']}
  assert {
    'time: one-call vs minimal',
    'time: one-call vs contrib opaque',
    'time: two-phase vs one-call',
    'memory: two-phase footprint < contrib transparent',
    'memory: argument bytes = minimal + documented state',
    'memory: footprint <= minimal + documented state',
  } <= kinds
  for t in model['targets']:
    assert t['verdict'] in ('PASS', 'MISS')
    assert isinstance(t['within_noise'], bool)
  # Time ratios are reported, never asserted: only their presence is checked.
  one_call = [t for t in model['targets'] if t['target'] == 'time: one-call vs minimal']
  assert sorted(t['case'] for t in one_call) == sorted(f'{v}/1call' for v in VARIANTS)


def test_markdown(output):
  _, data, markdown = output
  assert '`python -m benchmarks.run --quick' in markdown
  assert data['environment']['date'] in markdown
  assert '### mlp-w32' in markdown
  assert '| case | calls / SAM step | ms / SAM step |' in markdown
  assert '| variant | 1-call time / minimal (<= 1.02)' in markdown
  assert '### Parameter-count sweep' in markdown
  for v in VARIANTS:
    assert f'| {v}/1call | 1 |' in markdown
  for v in TWO_PHASE:
    assert f'| {v}/2phase | 2 |' in markdown
  tables, current = [], []
  for line in markdown.splitlines() + ['']:
    if line.startswith('|'):
      current.append(line)
    elif current:
      tables.append(current)
      current = []
  assert len(tables) >= 3
  for table in tables:  # every row has as many cells as the header, and a separator row follows it
    assert set(table[1]) <= set('|-: ')
    assert all(row.endswith('|') and row.count('|') == table[0].count('|') for row in table)


def test_bad_model_name_is_rejected():
  with pytest.raises(SystemExit):
    run.parse_args(['--models', 'mlp,transformer'])


def test_default_models():
  assert run.parse_args([]).models == ['mlp', 'cnn', 'resnet18', 'sweep']
  assert run.parse_args(['--quick']).models == ['mlp', 'cnn', 'sweep']


def test_mixed_precision_benchmark_quick_mode_writes_its_tables(tmp_path):
  from benchmarks import mixed_precision

  text = mixed_precision.main(['--quick', '--out', str(tmp_path)])
  data = json.loads((tmp_path / 'mixed_precision.json').read_text())
  assert [r['setting'] for r in data['rows']] == list(mixed_precision.SETTINGS)
  assert set(data['timing']) == {'19k'}
  before, after, _ = data['rows']
  assert after['moved'] > before['moved'] and after['error'] < before['error']
  assert (tmp_path / 'mixed_precision.md').read_text() == text
