"""Cost of m-sharpness groups and of gradient accumulation against one SAM step on the same batch.

Run from the repository root::

  python -m benchmarks.micro_batches             # MLP and 1-D CNN at batch 128
  python -m benchmarks.micro_batches --quick     # tiny models, a few rounds (checks the script)

Cases, all SAM (``optax_sam.sam`` on SGD with momentum) on the same batch:

* ``sam``: the ordinary one-call step on the whole batch (the reference);
* ``m=8/scan``, ``m=8/vmap``, ``m=32/scan``, ``m=32/vmap``: ``micro_batches`` with
  groups of 8 and 32 examples on each route;
* ``accumulate/4``: ``accumulated_grad_fn`` over 4 micro-batches for both gradients (one
  perturbation for the whole batch: the same algorithm as ``sam``).

The grouped steps compute no loss (their clean gradients are the step's own), the others get it
from ``value_and_grad``. Each case is compiled once with donated arguments and timed in
interleaved rounds as in :mod:`benchmarks.harness`; the table gives the median ratio of each case's
time per step to ``sam``'s, with a bootstrap 95% interval, and the compiled temporaries
(``memory_analysis()``). Writes ``micro_batches.json`` and ``micro_batches.md`` into ``--out``.
"""

import jax
import jax.numpy as jnp
import optax

import optax_sam
from benchmarks import cases as cases_lib
from benchmarks import harness, models

GROUP_SIZES = (8, 32)
MICRO_BATCHES = 4


def _grouped_step(model: models.Model, tx, group_size: int, route: str):
  def step(params, opt_state, model_state, batch):
    grad = jax.grad(lambda p, b: model.loss(p, model_state, b)[0])
    groups = optax_sam.micro_batches(grad, batch, group_size, route=route)
    updates, opt_state = tx.update(None, opt_state, params, grad_fn=groups)
    return optax.apply_updates(params, updates), opt_state, model_state, jnp.zeros([])

  return step


def _accumulated_step(model: models.Model, tx, count: int):
  def step(params, opt_state, model_state, batch):
    grad = jax.grad(lambda p, b: model.loss(p, model_state, b)[0])
    acc = optax_sam.accumulated_grad_fn(grad, batch, len(batch[1]) // count)
    updates, opt_state = tx.update(acc(params), opt_state, params, grad_fn=acc)
    return optax.apply_updates(params, updates), opt_state, model_state, jnp.zeros([])

  return step


def build(model: models.Model, group_sizes=GROUP_SIZES) -> list:
  """The cases above, as :class:`benchmarks.cases.Case` s."""
  tx = optax_sam.sam(cases_lib.base_optimizer(), rho=cases_lib.RHO)
  case = lambda name, step: cases_lib.Case(
    name, 'optax_sam', 'sam', '1call', 1, tx.init, step, None
  )
  cases = [case('sam', cases_lib._one_call_step(model, tx, False))]
  for m in group_sizes:
    for route in ('scan', 'vmap'):
      cases.append(case(f'm={m}/{route}', _grouped_step(model, tx, m, route)))
  cases.append(case(f'accumulate/{MICRO_BATCHES}', _accumulated_step(model, tx, MICRO_BATCHES)))
  return cases


def measure(
  model: models.Model, settings: harness.Settings, group_sizes=GROUP_SIZES, log=print
) -> dict:
  params, model_state = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1))
  runners = [
    harness.Runner(c, params, model_state, batch, settings.compiler_options)
    for c in build(model, group_sizes)
  ]
  log(f'\n== {model.name}: {model.description}, batch {model.batch_size}')
  timed = harness.side_by_side(runners, 'sam', settings, log)
  return dict(name=model.name, description=model.description, batch_size=model.batch_size, **timed)


def markdown(results: list) -> str:
  return harness.side_table(
    results,
    lambda m: f'batch {m["batch_size"]}',
    'sam',
    [
      ('temporaries (bytes)', lambda name, c, m: f'{c["temp_bytes"]:,}'),
      ('vs sam', lambda name, c, m: f'{c["temp_bytes"] / m["cases"]["sam"]["temp_bytes"]:.2f}x'),
    ],
  )


def main(argv=None) -> dict:
  args = harness.side_arguments(__doc__, 'benchmarks/results/micro-batches-cpu', argv)
  settings = harness.side_settings(args)
  specs = harness.model_specs(args.quick, resnet_batch=128)
  group_sizes = (2, 4) if args.quick else GROUP_SIZES  # quick models have batch 8
  results = [measure(specs[name][0], settings, group_sizes) for name in args.models.split(',')]
  harness.save(args.out, 'micro_batches', argv, results, markdown(results))
  return dict(models=results)


if __name__ == '__main__':
  main()
