"""The training example on 2 processes of this machine: same numbers as 1 process, resumable.

The 2-process runs start two ``python -m optax_sam.examples.train`` processes
with ``--coordinator localhost:PORT --num-processes 2 --process-id 0|1
--cpu-devices 4`` (gloo CPU collectives over loopback, a free port), through
tests/test_multihost.py's launcher, which fails the test with both processes'
output when one fails, dies or hangs. Their result is compared with the same
run on the 8 fake devices of this test process (the root conftest.py's), which
is the single-process, 8-device run of the same setting.
"""

import json
import pathlib
import sys

import numpy as np
import pytest

from optax_sam.examples import checkpoints as checkpoints_lib
from optax_sam.examples import config as config_lib
from optax_sam.examples import main as main_lib
from optax_sam.examples import multiprocess, reporting, train
from tests.integration.test_example import restored_state
from tests.test_multihost import _run_job

# 160 training examples (5 steps of 32), 40 test examples, a 4-channel ResNet; a constant
# learning rate, so that a run resumed with more epochs continues the shorter one exactly.
SETTING = [
  '--num-samples=200',
  '--width=4',
  '--batch-size=32',
  '--lr-schedule=constant',
  '--no-progress',
]
JOB_TIMEOUT_S = 400
EPOCH_LINE = 'epoch   '
FINAL_LINE = 'final test accuracy: '


def _two_processes(tmp_path: pathlib.Path, job: str, *flags: str) -> list[str]:
  """Runs the example on 2 processes into ``tmp_path / 'run'``; returns each one's output."""
  folder = tmp_path / job
  folder.mkdir()
  command = lambda i, port, out: [
    sys.executable,
    '-m',
    'optax_sam.examples.train',
    *SETTING,
    f'--data-dir={tmp_path / "data"}',
    f'--workdir={tmp_path / "run"}',
    f'--coordinator=localhost:{port}',
    '--num-processes=2',
    f'--process-id={i}',
    '--cpu-devices=4',
    *flags,
  ]
  _run_job(folder, command, processes=2, timeout=JOB_TIMEOUT_S)
  return [(folder / f'process{i}.log').read_text() for i in range(2)]


def _lines(output: str, prefix: str) -> list[str]:
  return [line for line in output.splitlines() if line.startswith(prefix)]


def _without_seconds(history: list[dict]) -> list[dict]:
  return [{k: v for k, v in h.items() if k != 'seconds'} for h in history]


def _assert_histories_close(got: list[dict], want: list[dict]) -> None:
  got, want = _without_seconds(got), _without_seconds(want)
  assert [h['epoch'] for h in got] == [h['epoch'] for h in want]
  for a, b in zip(got, want, strict=True):
    assert a.keys() == b.keys()
    for name in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy'):
      assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), (a['epoch'], name)
    for name, value in b['step_statistics'].items():
      assert a['step_statistics'][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def _checkpointed_leaves(workdir: pathlib.Path, config: config_lib.Config) -> list[np.ndarray]:
  """Every array of the last checkpoint in ``workdir``, restored onto this process's device."""
  _, _, state, _ = restored_state(workdir, config, train.load_dataset(config))
  return [np.asarray(leaf) for leaf in checkpoints_lib._flat(state).values()]


def _single_process_run(tmp_path: pathlib.Path, epochs: int) -> tuple[dict, list[str]]:
  """The same command on this process's 8 devices, data-parallel over all of them."""
  argv = SETTING + [
    f'--epochs={epochs}',
    f'--data-dir={tmp_path / "data"}',
    f'--workdir={tmp_path / "one"}',
  ]
  lines = []
  results = main_lib.run(
    main_lib.make_plan(argv), log=lines.append, parallel=multiprocess.data_parallel()
  )
  return results['sam'], lines


def test_two_processes_match_one_process_write_once_and_resume(tmp_path):
  run = tmp_path / 'run'
  # 1 epoch on 2 processes, then --resume to 2 epochs: the interrupted run.
  first = _two_processes(tmp_path, 'first', '--epochs=1')
  after_one = json.loads((run / reporting.METRICS_FILE).read_text())
  resumed = _two_processes(tmp_path, 'resumed', '--epochs=2', '--resume')
  metrics = json.loads((run / reporting.METRICS_FILE).read_text())

  # Process 0 logs and writes; process 1 says who it is and nothing else.
  for output, epochs, final in ((first, ['1/1'], after_one), (resumed, ['2/2'], metrics)):
    assert output[0].splitlines()[0] == 'process 0 of 2: 4 of 8 cpu devices'
    assert [line.split()[1] for line in _lines(output[0], EPOCH_LINE)] == epochs
    accuracy = final['final']['test_accuracy']
    assert _lines(output[0], FINAL_LINE) == [f'{FINAL_LINE}{accuracy:.4f}']
    assert output[1].splitlines()[0] == 'process 1 of 2: 4 of 8 cpu devices'
    assert not _lines(output[1], EPOCH_LINE) and not _lines(output[1], FINAL_LINE)
    assert 'metrics and plot in' not in output[1]
  assert f'resumed from epoch 1 in {run / checkpoints_lib.CHECKPOINT_DIR}' in resumed[0]
  assert sorted(p.name for p in run.iterdir()) == sorted(
    [
      checkpoints_lib.CHECKPOINT_DIR,
      reporting.METRICS_FILE,
      reporting.CURVES_FILE,
      reporting.SHARPNESS_PLOT,
    ]
  )
  assert (run / reporting.CURVES_FILE).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert [h['epoch'] for h in metrics['history']] == [1, 2]
  assert metrics['history'][:1] == after_one['history']  # the resumed run kept epoch 1

  # The same command on 1 process with 8 devices, without interruption.
  single, lines = _single_process_run(tmp_path, epochs=2)
  assert lines[-1] == f'{FINAL_LINE}{single["final"]["test_accuracy"]:.4f}'
  _assert_histories_close(metrics['history'], single['history'])
  assert metrics['final']['test_accuracy'] == single['final']['test_accuracy']
  assert metrics['final']['test_loss'] == pytest.approx(single['final']['test_loss'], rel=1e-5)
  plan = main_lib.make_plan(SETTING + ['--epochs=2', f'--data-dir={tmp_path / "data"}'])
  config = plan.runs[0][0]
  got, want = _checkpointed_leaves(run, config), _checkpointed_leaves(tmp_path / 'one', config)
  assert len(got) == len(want) > 10
  for a, b in zip(got, want, strict=True):  # params, BatchNorm, RNG state, SGD and SAM state
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class _NotProcessZero(multiprocess.DataParallel):
  """The mesh of this process's 8 devices, seen as a process other than 0 sees it."""

  writes = False


def test_a_process_other_than_0_logs_and_writes_nothing_but_the_checkpoint(tmp_path):
  plan = main_lib.make_plan(
    SETTING + ['--epochs=1', f'--data-dir={tmp_path / "data"}', f'--workdir={tmp_path / "w"}']
  )
  lines = []
  parallel = _NotProcessZero(multiprocess.data_parallel().mesh)
  results = main_lib.run(plan, log=lines.append, parallel=parallel)
  assert lines == []
  assert [h['epoch'] for h in results['sam']['history']] == [1]
  assert sorted(p.name for p in (tmp_path / 'w').iterdir()) == [checkpoints_lib.CHECKPOINT_DIR]
  saved = checkpoints_lib.Checkpoints(tmp_path / 'w' / checkpoints_lib.CHECKPOINT_DIR, create=False)
  assert saved.latest_epoch() == 1


@pytest.mark.parametrize(
  ('flags', 'message'),
  [
    (['--coordinator=localhost:1234'], 'go together; got only --coordinator'),
    (['--num-processes=2', '--process-id=0'], 'got only --num-processes, --process-id'),
    (['--coordinator=localhost', '--num-processes=2', '--process-id=0'], 'must be HOST:PORT'),
    (['--coordinator=h:1', '--num-processes=2', '--process-id=2'], r'must be in \[0, 2\)'),
    (['--coordinator=h:1', '--num-processes=0', '--process-id=0'], 'must be an integer >= 1'),
    (['--cluster', '--coordinator=h:1', '--num-processes=2', '--process-id=0'], 'either --cluster'),
    (['--cpu-devices=0'], '--cpu-devices must be an integer >= 1'),
  ],
)
def test_bad_process_options_are_config_errors(tmp_path, flags, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    main_lib.make_plan(SETTING + [f'--workdir={tmp_path / "w"}', *flags])
  assert not (tmp_path / 'w').exists()


def test_the_batch_must_split_over_every_device(tmp_path):
  plan = main_lib.make_plan(
    SETTING + ['--batch-size=36', f'--data-dir={tmp_path / "data"}', f'--workdir={tmp_path}/w']
  )
  with pytest.raises(config_lib.ConfigError, match='multiple of the 8 devices of all processes'):
    main_lib.run(plan, parallel=multiprocess.data_parallel())
  assert not (tmp_path / 'w').exists()


def test_each_process_hands_over_its_own_rows():
  parallel = multiprocess.data_parallel()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  y = np.arange(16, dtype=np.int32)
  gx, gy = parallel.batch(x, y)
  assert parallel.rows(16) == slice(0, 16)  # one process: all rows
  np.testing.assert_array_equal(np.asarray(gx), x)
  assert [s.data.shape for s in gy.addressable_shards] == [(2,)] * 8
  assert parallel.padded_size(500) == 504
  with pytest.raises(ValueError, match='does not split over 8 devices'):
    parallel.rows(12)
