"""A process of tests/test_multihost.py: ``python -m tests.multihost_worker ID PORT OUT``.

Joins a ``jax.distributed`` job of 2 processes over loopback (gloo CPU
collectives), each with 4 fake CPU devices, so the mesh of
tests/test_distributed.py (8 devices) spans both processes. Every variant of
that file runs in one-call and two-phase mode with global perturbation
(sharded ``jit``: a sharded batch, replicated params) and with
``local_perturbation=True`` (``shard_map`` over the 8 devices), and every
variant takes m-sharpness steps through :func:`optax_sam.micro_batches` (both
routes; groups of 2 examples made inside a sharded ``jit``, and per device
under ``shard_map`` with the gradients averaged over both processes). Each
result is checked against the file's NumPy reference (single-device SAM on
the whole batch, or the per-device computation, which is m-sharpness with
m = 2) and, gathered across processes, against the other process's. Writes
a JSON summary to OUT and exits 0 only if every check passed.
"""

import json
import os
import sys
import traceback

PROCESSES, LOCAL_DEVICES = 2, 4


def _initialize(process_id: int, port: int) -> None:
  flags = os.environ.get('XLA_FLAGS', '')  # the test's compile flags
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=PROCESSES,
    process_id=process_id,
    initialization_timeout=60,
  )


def _checks() -> dict:
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from tests import test_distributed as td
  from tests import test_micro_batches as tm

  assert jax.process_count() == PROCESSES and jax.device_count() == td.N

  def same_on_every_process(tree):
    """Each process's copy of a replicated tree, gathered: all rows equal."""
    local = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree.leaves(tree)]
    gathered = multihost_utils.process_allgather(local)
    for leaf in gathered:
      for p in range(1, PROCESSES):
        np.testing.assert_array_equal(leaf[p], leaf[0])

  def global_jit(name, two_phase):
    """Sharded jit: the batch split over the 8 devices of both processes."""
    tx = td.VARIANTS[name][0](two_phase=two_phase)
    mesh = td._mesh()
    put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
    args = (put(td.PARAMS, P()), put(tx.init(td.PARAMS), P()))
    args += (put(td.X, P(td.AXIS)), put(td.Y, P(td.AXIS)))
    (params, state), _ = td._compile_and_run(
      jax.jit(td._train_step(tx, two_phase)), args, two_phase
    )
    return params, state

  def local_shard_map(name, two_phase):
    """shard_map with local perturbation; per-device carry in two-phase mode (see td)."""
    if two_phase:
      stacked_params, stacked_state = td._run_shard_map_per_device_carry(name, True, True)
      return stacked_params, stacked_state
    params, stacked, _ = td._run_shard_map(name, False, True)
    return params, stacked

  def micro_batches(name, route, placement):
    """m-sharpness, m = 2: 8 groups made in a sharded jit, or 1 group per device (shard_map)."""
    mesh = td._mesh()
    put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
    if placement == 'jit':
      tx = td.VARIANTS[name][0]()
      fn = jax.jit(tm._grouped_step(tx, route))
    else:
      tx = td.VARIANTS[name][0](axis_name=td.AXIS)
      specs = (P(), P(), P(td.AXIS), P(td.AXIS))
      # Replicated out_specs: the gradients are averaged over the 8 devices, so every device
      # takes the same step (same_on_every_process checks it across the two processes).
      body = jax.shard_map(
        tm._grouped_step(tx, route), mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False
      )
      fn = jax.jit(body)
    params, state = put(td.PARAMS, P()), put(tx.init(td.PARAMS), P())
    x, y = put(td.X, P(td.AXIS)), put(td.Y, P(td.AXIS))
    for _ in range(td.STEPS):
      params, state = fn(params, state, x, y)
    return params, state

  results = {}
  for name in td.VARIANTS:
    for route in tm.ROUTES:
      for placement in ('jit', 'shard_map'):
        key = f'{name}/micro_batches/{route}/{placement}'
        params, state = micro_batches(name, route, placement)
        same_on_every_process((params, state))
        params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
        error = td._max_diff(params, td._reference(name, local=True))
        results[key] = error
        assert error < 3e-6, (key, error)  # tests/test_micro_batches.py's tolerance
  for name in td.VARIANTS:
    for two_phase in (False, True):
      for local in (False, True):
        key = f'{name}/{"two_phase" if two_phase else "one_call"}/{"local" if local else "global"}'
        run = local_shard_map if local else global_jit
        params, state = run(name, two_phase)
        if local and two_phase:
          # Per-device copies, gathered from both processes: the same on all 8 devices, as
          # tests/test_distributed.py asserts them (to rounding where the design says so).
          stacked_params, stacked_state = multihost_utils.process_allgather(
            (params, state), tiled=True
          )
          td._assert_replicas(stacked_params, stacked_state, two_phase=True, local=True)
          params = jax.tree.map(lambda a: a[0], stacked_params)
        else:
          same_on_every_process((params, state))
          params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
        want = td._reference(name, local)
        error = td._max_diff(params, want)
        results[key] = error
        assert error < 2e-6, (key, error)
  return results


def main(argv: list) -> int:
  process_id, port, out = int(argv[0]), int(argv[1]), argv[2]
  summary = {'process_id': process_id}
  try:
    _initialize(process_id, port)
    summary['max_errors'] = _checks()
    summary['ok'] = True
  except Exception:  # reported to the test with the traceback
    summary['ok'] = False
    summary['error'] = traceback.format_exc()
  with open(out, 'w') as f:
    json.dump(summary, f)
  print(json.dumps(summary), flush=True)
  return 0 if summary['ok'] else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
