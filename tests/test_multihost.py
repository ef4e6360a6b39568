"""SAM across 2 JAX processes on this machine: the same result on every process, and the right one.

Starts two ``python -m tests.multihost_worker`` processes that join one
``jax.distributed`` job over loopback (gloo CPU collectives, 4 fake devices
each, a coordinator on a free port). Each runs every variant of
tests/test_distributed.py in both calling modes with global and local
perturbation and checks its results (see the worker's docstring). A process
that fails, dies or hangs fails the test with both processes' output.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker(i: int, port: int, out: pathlib.Path) -> list:
  return [sys.executable, '-m', 'tests.multihost_worker', str(i), str(port), str(out)]


def _run_job(tmp_path: pathlib.Path, command=_worker, processes=2, timeout=TIMEOUT_S) -> list:
  """Runs ``processes`` processes as one job; returns their JSON summaries.

  ``command(i, port, out)`` is process ``i``'s command line; a process may write a
  JSON summary to ``out`` (``None`` in the list where it wrote none). Each
  process's output stays in ``tmp_path / f'process{i}.log'``.

  Fails the test with every process's output if one exits non-zero or any is
  still running after ``timeout`` seconds (then all are killed).
  """
  port = _free_port()
  env = helpers.child_environment()  # the workers set their devices and platform
  env.pop('JAX_PLATFORMS', None)
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  procs, logs = [], []
  for i in range(processes):
    log = open(tmp_path / f'process{i}.log', 'w+')  # noqa: SIM115 (closed below)
    out = tmp_path / f'process{i}.json'
    procs.append(
      subprocess.Popen(
        command(i, port, out), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
      )
    )
    logs.append(log)
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read()[-6000:])
    log.close()
  report = '\n'.join(
    f'--- process {i} (exit {p.returncode}):\n{o}'
    for i, (p, o) in enumerate(zip(procs, outputs, strict=True))
  )
  if any(p.returncode != 0 for p in procs):
    pytest.fail(f'a process failed, died or hung ({timeout} s limit):\n{report}')
  summaries = [tmp_path / f'process{i}.json' for i in range(processes)]
  return [json.loads(path.read_text()) if path.exists() else None for path in summaries]


def test_every_variant_agrees_across_two_processes(tmp_path):
  summaries = _run_job(tmp_path)
  for s in summaries:
    assert s['ok'], s.get('error')
  checked = summaries[0]['max_errors']
  micro = {k: v for k, v in checked.items() if '/micro_batches/' in k}
  assert len(checked) - len(micro) == 8 * 2 * 2  # variants x modes x global/local
  assert len(micro) == 8 * 2 * 2  # variants x routes x sharded jit/shard_map
  assert summaries[1]['max_errors'].keys() == checked.keys()
  assert max(v for k, v in checked.items() if k not in micro) < 2e-6
  assert max(micro.values()) < 3e-6


def test_a_dead_or_hung_process_fails_with_the_output_of_all(tmp_path):
  dies = lambda i, port, out: [
    sys.executable,
    '-c',
    f'print("process {i} here"); raise SystemExit(i)',
  ]
  with pytest.raises(pytest.fail.Exception, match=r'(?s)process 0 here.*exit 1.*process 1 here'):
    _run_job(tmp_path, dies)
  hangs = lambda i, port, out: [sys.executable, '-c', 'import time; time.sleep(600)']
  started = time.monotonic()
  with pytest.raises(pytest.fail.Exception, match='died or hung'):
    _run_job(tmp_path, hangs, timeout=3)
  assert time.monotonic() - started < 60  # killed at the limit, not waited for


def test_the_benchmark_counts_the_elements_of_tuple_all_reduces():
  from benchmarks import multihost

  hlo = (
    '%all-reduce.6 = (f32[512]{0}, f32[512,784]{1,0}, f32[512]{0}, f32[512,512]{1,0}, '
    'f32[10]{0}, /*index=5*/f32[10,512]{1,0}) all-reduce(%fusion.1, %d)\n'
    '%all-reduce.7 = f32[] all-reduce(%x)'
  )
  assert multihost.collectives(hlo) == [['all-reduce', 669706], ['all-reduce', 1]]
