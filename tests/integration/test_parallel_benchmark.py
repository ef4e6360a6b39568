"""SAMPa's side-by-side benchmark and the micro-batch one in quick mode: structure, never timing."""

import json

from benchmarks import micro_batches, parallel


def test_parallel_quick_mode_measures_one_and_two_devices(tmp_path):
  parallel.main(['--quick', '--models', 'mlp', '--out', str(tmp_path)])
  data = json.loads((tmp_path / 'parallel.json').read_text())
  one, two = data['models']
  assert (one['devices'], two['devices']) == (1, 2)
  assert list(one['cases']) == ['base', 'sam', 'sampa/vmap', 'sampa/sequential']
  assert list(two['cases']) == [
    'base',
    'sam',
    'sampa/vmap',
    'sampa/pair-axis',
    'sampa/pair-sharding',
  ]
  for model in (one, two):
    assert model['rounds'] >= 3
    for case in model['cases'].values():
      assert case['time_ms'] > 0 and case['ci95'][0] <= case['ratio_vs_base'] <= case['ci95'][1]
  # The vmapped pair holds both points' activations at once: more temporaries than the sequence.
  vmapped, sequential = (one['cases'][n]['temp_bytes'] for n in ('sampa/vmap', 'sampa/sequential'))
  assert vmapped > sequential
  text = (tmp_path / 'parallel.md').read_text()
  assert '(2 devices)' in text and 'sampa/pair-axis' in text


def test_micro_batches_quick_mode(tmp_path):
  micro_batches.main(['--quick', '--models', 'mlp', '--out', str(tmp_path)])
  (model,) = json.loads((tmp_path / 'micro_batches.json').read_text())['models']
  groups = [f'm={m}/{route}' for m in (2, 4) for route in ('scan', 'vmap')]
  assert list(model['cases']) == ['sam', *groups, 'accumulate/4']
  assert model['cases']['sam']['ratio_vs_sam'] == 1.0
