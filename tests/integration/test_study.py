"""The F-SAM / StableSAM study: its summary math on hand-made numbers, and its smoke run end to end.

The smoke run checks the structure of what the study writes, never its accuracies.
"""

import doctest
import json
import math
import pathlib
import subprocess
import sys

import pytest

from benchmarks import paired, study
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_paired_difference_higher_lower_and_no_difference():
  # per-seed differences 0.01, 0.02, 0.03: mean 0.02 > std 0.01
  d = paired.paired_difference([0.80, 0.82, 0.84], [0.79, 0.80, 0.81])
  assert d['mean'] == pytest.approx(0.02) and d['std'] == pytest.approx(0.01)
  assert (d['n'], d['wins'], d['verdict']) == (3, 3, 'higher')
  d = paired.paired_difference([0.79, 0.80, 0.81], [0.80, 0.82, 0.84])
  assert d['mean'] == pytest.approx(-0.02) and (d['wins'], d['verdict']) == (0, 'lower')
  # differences 0.03, -0.01, 0.01: mean 0.01 < std 0.02, so no difference
  d = paired.paired_difference([0.83, 0.79, 0.81], [0.80, 0.80, 0.80])
  assert d['mean'] == pytest.approx(0.01) and d['std'] == pytest.approx(0.02)
  assert (d['wins'], d['verdict']) == (2, 'no difference')
  d = paired.paired_difference([1.0, 3.0], [0.0, 0.0])  # mean 2, std sqrt(2) < 2
  assert d['std'] == pytest.approx(math.sqrt(2)) and d['verdict'] == 'higher'
  d = paired.paired_difference([0.0, 2.0, 4.0], [0.0, 0.0, 2.0])  # diffs 0, 2, 2: mean 4/3
  assert d['std'] == pytest.approx(math.sqrt(4 / 3)) and d['verdict'] == 'higher'
  d = paired.paired_difference([0.0, 2.0], [0.0, 0.0])  # diffs 0, 2: mean 1 < std 1.414
  assert d['verdict'] == 'no difference'
  d = paired.paired_difference([0.3, 0.3], [0.3, 0.3])  # zero is no difference, even at std 0
  assert (d['mean'], d['std'], d['verdict']) == (0.0, 0.0, 'no difference')


def test_paired_difference_threshold_missing_values_and_bad_input():
  d = paired.paired_difference([0.80, 0.82, 0.84], [0.79, 0.80, 0.81], threshold=0.05)
  assert d['verdict'] == 'no difference'
  # a NaN or missing seed drops that pair only
  d = paired.paired_difference([0.9, math.nan, 0.7, None], [0.8, 0.8, 0.8, 0.8])
  assert d['n'] == 2 and d['mean'] == pytest.approx(0.0)
  one = paired.paired_difference([0.9], [0.8])
  assert one['std'] is None and one['verdict'] == 'no difference'
  none = paired.paired_difference([math.nan], [0.8])
  assert none['n'] == 0 and none['mean'] is None and none['verdict'] == 'no difference'
  with pytest.raises(ValueError, match='same seeds'):
    paired.paired_difference([0.1, 0.2], [0.1])


def test_mean_std_skips_missing_values():
  assert paired.mean_std([1.0, 2.0, 3.0, math.nan, None]) == dict(mean=2.0, std=1.0, n=3)
  assert paired.mean_std([4.0]) == dict(mean=4.0, std=0.0, n=1)
  assert paired.mean_std([None, math.nan]) == dict(mean=None, std=None, n=0)


def test_stability_reads_the_sorted_learning_rates():
  rows = {
    '2': dict(diverged=1, failed=3, runs=3),
    '0.05': dict(diverged=0, failed=0, runs=3),
    '1': dict(diverged=0, failed=1, runs=3),
    '5': dict(diverged=3, failed=3, runs=3),
  }
  assert study.stability(rows) == dict(largest_stable=1.0, first_diverged=2.0)
  assert study.stability(rows, 'failed') == dict(largest_stable=0.05, first_diverged=1.0)
  fine = {'0.1': dict(diverged=0, runs=2), '0.5': dict(diverged=0, runs=2)}
  assert study.stability(fine) == dict(largest_stable=0.5, first_diverged=None)
  bad = {'0.1': dict(diverged=2, runs=2)}
  assert study.stability(bad) == dict(largest_stable=None, first_diverged=0.1)


def test_trained_needs_no_divergence_and_half_the_train_accuracy():
  assert study.trained(dict(diverged=False, train_accuracy=0.5))
  assert not study.trained(dict(diverged=False, train_accuracy=0.49))
  assert not study.trained(dict(diverged=True, train_accuracy=0.9))
  assert not study.trained(dict(diverged=False, train_accuracy=math.nan))


def _run(optimizer, seed, acc, parts, rho=0.05, lr=0.2, noise=0.0, loss=0.1, train_acc=0.9):
  return dict(
    optimizer=optimizer, seed=seed, label_noise=noise, rho=rho, lr=lr, parts=parts,
    test_accuracy=acc, train_loss=loss, train_accuracy=train_acc,
    diverged=not math.isfinite(loss) or loss > paired.DIVERGED_LOSS,
    hessian_top_eigenvalue=10.0 + seed,
  )  # fmt: skip


def test_summarize_on_hand_made_runs():
  setting = study.Setting(
    base=study.smoke_setting().base,
    seeds=(0, 1, 2),
    noises=(0.0,),
    optimizers=('sgd', 'sam'),
    rhos=(0.05, 0.5),
    lrs=(0.2, 3.0),
    lr_seeds=(0, 1),
    lr_optimizers=('sam',),
  )
  runs = []
  for seed, (a_sgd, a_sam) in enumerate([(0.80, 0.82), (0.81, 0.84), (0.79, 0.80)]):
    runs.append(_run('sgd', seed, a_sgd, ['main'], rho=0.0))
    parts = ['main', 'rho'] + (['lr'] if seed < 2 else [])
    runs.append(_run('sam', seed, a_sam, parts))
    runs.append(_run('fsam', seed, a_sam + (0.01, -0.01, 0.0)[seed], ['rho']))
    runs.append(_run('sam', seed, 0.70, ['rho'], rho=0.5))
    runs.append(_run('fsam', seed, 0.75, ['rho'], rho=0.5))
  runs.append(_run('sam', 0, 0.1, ['lr'], lr=3.0, loss=math.nan, train_acc=math.nan))
  runs.append(_run('sam', 1, 0.6, ['lr'], lr=3.0, loss=1.5, train_acc=0.4))
  table = study.summarize(runs, setting)

  main = table['main']['0.0']
  assert main['sam']['test_accuracy']['mean'] == pytest.approx(0.82)
  assert main['sgd']['test_accuracy']['std'] == pytest.approx(0.01)
  vs_sgd = main['sam']['vs_sgd']  # differences 0.02, 0.03, 0.01
  assert vs_sgd['mean'] == pytest.approx(0.02) and vs_sgd['verdict'] == 'higher'
  assert main['sgd']['vs_sam']['verdict'] == 'lower' and 'vs_sgd' not in main['sgd']
  assert main['sam']['hessian_top_eigenvalue'] == dict(mean=11.0, std=1.0, n=3)
  assert main['sam']['rho'] == 0.05 and main['sgd']['rho'] == 0.0

  rho = table['rho']
  assert rho['fsam_vs_sam']['0.05']['verdict'] == 'no difference'  # diffs 0.01, -0.01, 0
  assert rho['fsam_vs_sam']['0.5']['mean'] == pytest.approx(0.05)
  assert rho['fsam_vs_sam']['0.5']['verdict'] == 'higher'  # std 0
  assert rho['sam_range'] == pytest.approx(0.12) and rho['fsam_range'] == pytest.approx(0.07)

  lr = table['lr']['sam']
  assert (lr['0.2']['runs'], lr['0.2']['diverged'], lr['0.2']['failed']) == (2, 0, 0)
  assert (lr['3']['runs'], lr['3']['diverged'], lr['3']['failed']) == (2, 1, 2)
  assert lr['3']['train_loss'] == dict(mean=1.5, std=0.0, n=1)
  assert table['lr']['stable']['sam'] == dict(largest_stable=0.2, first_diverged=3.0)

  text = study.markdown(table, setting)
  assert '| SAM | 0.05 | 82.00 ± 2.00 |' in text
  assert '+2.00 ± 1.00 (higher, 3/3)' in text
  assert '| 0.05 | 82.00 ± 2.00 | 82.00 ± 1.73 | +0.00 ± 1.00 (no difference, 1/3) |' in text
  assert 'diverged 1/2, did not train 2/2' in text


def test_plan_trains_a_shared_run_once():
  setting = study.smoke_setting()
  runs = study.plan(setting)
  n = len(setting.seeds)
  main = len(setting.optimizers) * len(setting.noises) * n
  rho = len(setting.rho_optimizers) * len(setting.rhos) * n
  lr = len(setting.lr_optimizers) * len(setting.lrs) * len(setting.lr_seeds)
  shared_rho = len(setting.rho_optimizers) * n  # rho 0.05, no noise: main's runs
  shared_lr = 1 * len(setting.lr_seeds)  # SAM at the main lr, no noise
  assert len(runs) == main + rho + lr - shared_rho - shared_lr
  sam = [p for c, p in runs.items() if c.optimizer == 'sam' and c.rho == 0.05 and c.lr == 0.2
         and c.label_noise == 0.0]  # fmt: skip
  assert sam == [['main', 'rho', 'lr']] * n
  # runs of one optimizer setting are adjacent: each setting compiles once
  keys = [(c.optimizer, c.rho, c.lr) for c in runs]
  changes = sum(a != b for a, b in zip(keys, keys[1:], strict=False))
  assert changes == len(set(keys)) - 1


def test_docstring_examples():
  for module in (paired, study):
    assert doctest.testmod(module).failed == 0


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """``python -m benchmarks.study --smoke`` as a user runs it: its own process, one device."""
  out = tmp_path_factory.mktemp('study')
  command = [sys.executable, '-m', 'benchmarks.study', '--smoke', '--out', str(out)]
  env = helpers.child_environment()  # one device
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  assert 'Largest learning rate' in done.stdout  # it prints the tables it writes
  return out


def test_smoke_run_writes_every_part(smoke):
  data = json.loads((smoke / 'study.json').read_text())
  setting = study.smoke_setting()
  assert study.Setting.from_dict(data['setting']) == setting
  assert len(data['runs']) == len(study.plan(setting)) == data['info']['runs']
  assert not (smoke / 'study.partial.json').exists()
  for run in data['runs']:
    assert {'optimizer', 'seed', 'label_noise', 'rho', 'lr', 'parts', 'test_accuracy',
            'train_loss', 'train_accuracy', 'diverged', 'seconds'} <= set(run)  # fmt: skip
    assert 0.0 <= run['test_accuracy'] <= 1.0 and run['epochs_run'] == 1
    assert ('hessian_top_eigenvalue' in run) == ('main' in run['parts'])
  table = data['table']
  assert list(table['main']) == ['0.0', '0.4']
  for rows in table['main'].values():
    assert list(rows) == ['sgd', 'sam', 'fsam']
    assert rows['sam']['test_accuracy']['n'] == 2
    assert rows['fsam']['vs_sam']['n'] == 2 and rows['sam']['vs_sgd']['n'] == 2
    assert rows['fsam']['vs_sam']['verdict'] in ('higher', 'lower', 'no difference')
  assert set(table['rho']['sam']) == {'0.05', '0.5'} == set(table['rho']['fsam_vs_sam'])
  assert set(table['lr']) == {'sam', 'stablesam', 'stable', 'trains'}
  assert set(table['lr']['sam']) == {'0.2', '5'}
  assert all(r['runs'] == 2 for r in table['lr']['stablesam'].values())


def test_smoke_run_writes_tables_and_plot(smoke):
  text = (smoke / 'study.md').read_text()
  assert text.count('| optimizer | rho | test acc (%) |') == 2
  assert '| F-SAM |' in text and '| rho | SAM | F-SAM | F-SAM − SAM (paired) |' in text
  assert '| lr | SAM | StableSAM |' in text and 'Largest learning rate' in text
  assert (smoke / 'study.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # --report rewrites the tables from study.json alone
  (smoke / 'study.md').unlink()
  assert study.main(['--report', '--out', str(smoke)]) == 0
  assert (smoke / 'study.md').read_text() == text
