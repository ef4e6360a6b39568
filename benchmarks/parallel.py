"""SAMPa's step against SAM's and the base optimizer's, on one device and on two.

Run from the repository root::

  python -m benchmarks.parallel             # MLP and 1-D CNN at batch 128
  python -m benchmarks.parallel --quick     # tiny models, a few rounds (checks the script)

Cases, all around SGD with momentum on the same batch (full train steps, jitted with donated
arguments, timed in interleaved rounds as in :mod:`benchmarks.harness`):

* ``base``: one gradient and the base optimizer's update (the reference);
* ``sam``: ``optax_sam.sam``'s one-call step, two gradients one after the other;
* ``sampa/vmap``: ``optax_sam.sampa``, its two gradients as one ``vmap`` over the stacked points;
* ``sampa/sequential``: the same with ``pair_route='sequential'``.

With two devices (two accelerators, or on the CPU a second process started with two fake XLA
devices, which share the machine's cores; none with one accelerator):

* ``sampa/pair-axis``: ``shard_map`` over a mesh axis of 2, one gradient per device;
* ``sampa/pair-sharding``: ``jit`` with the stacked pair sharded over the 2 devices.

Every step but SAMPa's also computes the clean loss (``value_and_grad``); SAMPa's clean pass is
one forward for the reported loss, its gradient unused. Writes ``parallel.json`` and
``parallel.md`` into ``--out``.
"""

import json
import os
import subprocess
import sys

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sam
from benchmarks import cases as cases_lib
from benchmarks import harness, models

PAIR = 'pair'
CHILD_FLAG = '--two-devices-child'


def _sampa_step(model: models.Model, tx):
  """SAMPa's train step: the clean loss for the report, both gradients inside ``update``."""

  def step(params, opt_state, model_state, batch):
    loss, new_model_state = model.loss(params, model_state, batch)
    grad_fn = lambda p: jax.grad(model.loss, has_aux=True)(p, model_state, batch)[0]
    updates, opt_state = tx.update(None, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, new_model_state, loss

  return step


def _pair_axis_step(model: models.Model, tx, mesh):
  """SAMPa's step inside ``shard_map``: device ``i`` takes the gradient at point ``i``."""
  inner = _sampa_step(model, tx)
  return jax.shard_map(inner, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)


def build(model: models.Model, two_devices: bool) -> list:
  """The cases above (the one-device ones, or the two-device ones), as ``Case`` s."""
  base = cases_lib.base_optimizer()
  case = lambda name, tx, step: cases_lib.Case(
    name, 'optax_sam', name, '1call', 1, tx.init, step, None
  )
  sam = optax_sam.sam(base, cases_lib.RHO)
  sampa = optax_sam.sampa(base)
  cases = [
    case('base', base, cases_lib._plain_step(model, base)),
    case('sam', sam, cases_lib._one_call_step(model, sam, False)),
    case('sampa/vmap', sampa, _sampa_step(model, sampa)),
  ]
  if not two_devices:
    sequential = optax_sam.sampa(base, pair_route='sequential')
    return cases + [case('sampa/sequential', sequential, _sampa_step(model, sequential))]
  mesh = jax.sharding.Mesh(jax.devices()[:2], (PAIR,))
  split = optax_sam.sampa(base, pair_axis_name=PAIR)
  sharded = optax_sam.sampa(base, pair_sharding=NamedSharding(mesh, P(PAIR)))
  return cases + [
    case('sampa/pair-axis', split, _pair_axis_step(model, split, mesh)),
    case('sampa/pair-sharding', sharded, _sampa_step(model, sharded)),
  ]


def measure(model: models.Model, settings: harness.Settings, two_devices: bool, log=print) -> dict:
  params, model_state = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1))
  runners = [
    harness.Runner(c, params, model_state, batch, settings.compiler_options)
    for c in build(model, two_devices)
  ]
  devices = 2 if two_devices else 1
  log(f'\n== {model.name}: {model.description}, batch {model.batch_size}, {devices} device(s)')
  timed = harness.side_by_side(runners, 'base', settings, log)
  return dict(
    name=f'{model.name} ({devices} device{"s" if two_devices else ""})',
    description=model.description,
    batch_size=model.batch_size,
    devices=devices,
    **timed,
  )


def markdown(results: list) -> str:
  return harness.side_table(
    results,
    lambda m: f'batch {m["batch_size"]}, {m["devices"]} device(s)',
    'base',
    [('temporaries (bytes)', lambda name, c, m: f'{c["temp_bytes"]:,}')],
  )


def _two_device_results(argv: list) -> list:
  """The two-device cases, from a child process started with two XLA devices."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
    env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
  ).strip()
  command = [sys.executable, '-m', 'benchmarks.parallel', CHILD_FLAG, *argv]
  done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
  sys.stderr.write(done.stderr)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  child = CHILD_FLAG in argv
  rest = [a for a in argv if a != CHILD_FLAG]
  args = harness.side_arguments(__doc__, 'benchmarks/results/parallel-cpu', rest)
  settings = harness.side_settings(args)
  specs = harness.model_specs(args.quick, resnet_batch=128)
  log = (lambda line: print(line, file=sys.stderr)) if child else print
  if child:
    if len(jax.devices()) < 2:
      raise SystemExit('the two-device cases need two devices')
    results = [measure(specs[n][0], settings, True, log) for n in args.models.split(',')]
    print(json.dumps(results))
    return dict(models=results)
  results = [measure(specs[n][0], settings, False, log) for n in args.models.split(',')]
  if jax.device_count() >= 2:  # e.g. two GPUs: measured here
    results += [measure(specs[n][0], settings, True, log) for n in args.models.split(',')]
  elif jax.default_backend() == 'cpu':  # fake CPU devices need a process of their own
    results += _two_device_results(rest)
  else:
    log(f'one {jax.default_backend()} device: no two-device cases')
  harness.save(args.out, 'parallel', rest, results, markdown(results))
  return dict(models=results)


if __name__ == '__main__':
  main()
