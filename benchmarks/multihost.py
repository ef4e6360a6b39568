"""SAM across processes: the step time of 2 processes x 2 devices against 1 process x 4 devices.

Run from the repository root::

  python -m benchmarks.multihost                # 3 launches of each layout, alternating
  python -m benchmarks.multihost --quick        # 1 launch of each, few steps (CI)

Each launch starts a ``jax.distributed`` job on this machine (gloo CPU
collectives over loopback, fake CPU devices; the 1-process layout starts one
process with 4 devices) that trains the benchmark MLP (784-512-512-10, batch
128) data-parallel under sharded ``jit``: the batch is split over the 4
devices, the params are replicated. It times one-call SAM and the plain base
step (SGD with momentum) in interleaved rounds after a warm-up, and reads
the compiled steps' collectives. The layouts alternate launch by launch
so that machine noise falls on both; the reported ratios are medians over
launches. Both layouts compute the same step (the same global batch on 4
devices); what differs is that in the 2-process layout every all-reduce
crosses between processes.
"""

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Optional

TOTAL_DEVICES = 4
_COLLECTIVE = re.compile(
  r'=\s*(\([^=]*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)'
  r'(?:-start)?\('
)
_SHAPE = re.compile(r'\b[a-z]+[0-9]*\[([0-9,]*)\]')


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def collectives(hlo_text: str) -> list:
  """``[kind, elements]`` of every collective in a compiled HLO module (tuples summed)."""
  found = []
  for match in _COLLECTIVE.finditer(re.sub(r'/\*index=\d+\*/', '', hlo_text)):
    total = 0
    for dims in _SHAPE.findall(match.group(1)):
      n = 1
      for d in filter(None, dims.split(',')):
        n *= int(d)
      total += n
    found.append([match.group(2), total])
  return found


def worker(process_id: int, processes: int, port: int, out: str, rounds: int, steps: int) -> None:
  """One process of a launch: times SAM and base steps, writes a JSON summary (process 0)."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax

  jax.config.update('jax_num_cpu_devices', TOTAL_DEVICES // processes)
  if processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}', num_processes=processes, process_id=process_id
    )
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_sam
  from benchmarks import models

  model = models.mlp()
  params, _ = model.init(jax.random.key(0))
  params = jax.tree.map(np.asarray, params)  # host copies: each case gets its own buffers
  x, y = model.batch(jax.random.key(1))
  mesh = jax.make_mesh((TOTAL_DEVICES,), ('data',))
  put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
  loss = lambda p, x, y: model.loss(p, {}, (x, y))[0]
  grad_fn = jax.grad(loss)
  base = optax.sgd(0.05, momentum=0.9)
  cases = {'sam': optax_sam.sam(base, rho=0.05), 'base': base}
  compiled, carry, hlo = {}, {}, {}
  for name, tx in cases.items():

    def step(p, s, x, y, tx=tx, name=name):
      extra = {'grad_fn': lambda q: grad_fn(q, x, y)} if name == 'sam' else {}
      u, s = tx.update(grad_fn(p, x, y), s, p, **extra)
      return optax.apply_updates(p, u), s

    args = (put(params, P()), put(tx.init(params), P()))
    batch = (put(np.asarray(x), P('data')), put(np.asarray(y), P('data')))
    c = jax.jit(step, donate_argnums=(0, 1)).lower(*args, *batch).compile()
    compiled[name], carry[name], hlo[name] = c, (args, batch), c.as_text()
  times = {name: [] for name in cases}
  for r in range(rounds + 1):  # round 0 warms up
    for name in cases if r % 2 else reversed(list(cases)):
      (p, s), batch = carry[name]
      start = time.perf_counter()
      for _ in range(steps):
        p, s = compiled[name](p, s, *batch)
      jax.block_until_ready((p, s))
      if r:
        times[name].append((time.perf_counter() - start) / steps)
      carry[name] = ((p, s), batch)
  num_params = sum(v.size for v in jax.tree.leaves(params))
  summary = {
    'processes': processes,
    'sam_ms': float(np.median(times['sam']) * 1e3),
    'base_ms': float(np.median(times['base']) * 1e3),
    'collectives': {name: collectives(text) for name, text in hlo.items()},
    'num_params': num_params,
  }
  if process_id == 0:
    pathlib.Path(out).write_text(json.dumps(summary))
  if processes > 1:
    jax.distributed.shutdown()


def launch(processes: int, rounds: int, steps: int) -> dict:
  """Runs one launch of ``processes`` processes; returns process 0's summary."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'summary.json')
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
    cmd = lambda i: [
      sys.executable,
      '-m',
      'benchmarks.multihost',
      '--worker',
      f'{i},{processes},{port},{out},{rounds},{steps}',
    ]
    procs = [subprocess.Popen(cmd(i), env=env) for i in range(processes)]
    try:
      codes = [p.wait(timeout=600) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    if any(codes):
      raise RuntimeError(f'a benchmark process failed: exit codes {codes}')
    with open(out) as f:
      return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='one launch of each layout')
  parser.add_argument('--out', type=pathlib.Path, help='folder for multihost.json')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    i, processes, port, out, rounds, steps = args.worker.split(',')
    worker(int(i), int(processes), int(port), out, int(rounds), int(steps))
    return {}
  launches, rounds, steps = (1, 3, 2) if args.quick else (3, 10, 5)
  runs = {1: [], 2: []}
  for n in range(launches):
    for processes in (1, 2) if n % 2 == 0 else (2, 1):
      runs[processes].append(launch(processes, rounds, steps))
      print(json.dumps(runs[processes][-1]['collectives'] | {'processes': processes}), flush=True)
  median = lambda key, p: float(sorted(r[key] for r in runs[p])[len(runs[p]) // 2])
  result = {
    'launches': launches,
    'one_process': {k: median(k, 1) for k in ('sam_ms', 'base_ms')},
    'two_processes': {k: median(k, 2) for k in ('sam_ms', 'base_ms')},
    'collectives_sam': runs[2][0]['collectives']['sam'],
    'collectives_base': runs[2][0]['collectives']['base'],
    'num_params': runs[2][0]['num_params'],
  }
  result['sam_2proc_over_1proc'] = (
    result['two_processes']['sam_ms'] / result['one_process']['sam_ms']
  )
  result['base_2proc_over_1proc'] = (
    result['two_processes']['base_ms'] / result['one_process']['base_ms']
  )
  for layout in ('one_process', 'two_processes'):
    result[layout]['sam_over_2x_base'] = result[layout]['sam_ms'] / (2 * result[layout]['base_ms'])
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'multihost.json').write_text(json.dumps(result, indent=2) + '\n')
  print(json.dumps(result, indent=2))
  return result


if __name__ == '__main__':
  main()
