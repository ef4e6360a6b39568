"""Cost of the cheaper SAM variants against the base optimizer: step time and compiled memory.

Run from the repository root::

  python -m benchmarks.cheap                 # MLP and 1-D CNN, ~2 min per model
  python -m benchmarks.cheap --quick         # tiny models, a few rounds (checks the script)
  python -m benchmarks.cheap --models resnet18 --out DIR   # on a GPU: ResNet-18 at batch 128

Cases, all with :func:`benchmarks.cases.base_optimizer` (SGD with momentum):

* ``base``: the base optimizer's step (gradient, update, apply);
* ``sam``: SAM on every step (one-call mode);
* ``when/plain``: ``sam(..., when=after(10**9))``, so every step is a plain one;
* ``when/every(5)``: ``sam(..., when=every(5))``, timed over multiples of 5 steps;
* ``look_sam(k=5)``: LookSAM, timed over multiples of 5 steps;
* ``momentum_sam``: Momentum-SAM (one gradient per step);
* ``base+norm(v)``: the base step that also computes the global norm of its new
  momentum and nothing else of Momentum-SAM (no target): the one reduction
  Momentum-SAM's definition adds, so the floor under which no implementation of
  it can go on a compiler that does not fuse that norm into the momentum update
  (XLA:CPU does not).

Each case is compiled once with donated arguments (``memory_analysis()`` gives
its argument and temporary bytes), warmed up, then timed in interleaved rounds
as in :mod:`benchmarks.harness` (rotated order, reversed every other round). The
ratios are medians of per-round ratios to ``base`` with a bootstrap 95%
interval; the script prints PASS/MISS for each target and writes
``cheap.json`` and ``cheap.md`` into ``--out``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from benchmarks import cases as cases_lib
from benchmarks import harness, models
from optax_sam._src import numerics
from optax_sam._src import state as state_lib

TARGETS = {  # case: the largest allowed ratio of its time per step to the base step's
  'when/plain': 1.03,
  'when/every(5)': 1.25,
  'look_sam(k=5)': 1.30,
  'momentum_sam': 1.05,
}
PERIOD = 5
# The named variants (optax_sam._src.aliases.VARIANTS) this script measures, and their case.
VARIANT_CASES = {'looksam': 'look_sam(k=5)', 'msam': 'momentum_sam'}


class _NormState(NamedTuple):
  norm: jax.Array
  base_state: optax.OptState


def momentum_norm(base: optax.GradientTransformation) -> optax.GradientTransformation:
  """``base``, whose state also keeps the global norm of its new momentum.

  The norm is computed as :func:`optax_sam.momentum_sam` computes it and kept in
  the state (so the compiler cannot drop it); the updates are the base
  optimizer's. Its cost over ``base`` is the floor of Momentum-SAM's.
  """

  def init_fn(params):
    return _NormState(jnp.zeros([], numerics.accumulation_dtype(params)), base.init(params))

  def update_fn(updates, state, params=None):
    updates, base_state = base.update(updates, state.base_state, params)
    norm = numerics.global_norm(state_lib.momentum(base_state))
    return updates, _NormState(norm, base_state)

  return optax.GradientTransformation(init_fn, update_fn)


def build(model: models.Model) -> list:
  """The cases above, as :class:`benchmarks.cases.Case` s."""
  base = cases_lib.base_optimizer()
  plain = cases_lib._plain_step
  one_call = lambda tx: cases_lib._one_call_step(model, tx, False)
  txs = {
    'sam': optax_sam.sam(base, rho=cases_lib.RHO),
    'when/plain': optax_sam.sam(base, rho=cases_lib.RHO, when=optax_sam.after(10**9)),
    'when/every(5)': optax_sam.sam(base, rho=cases_lib.RHO, when=optax_sam.every(PERIOD)),
    'look_sam(k=5)': optax_sam.look_sam(base, rho=cases_lib.RHO, k=PERIOD),
  }
  cases = [cases_lib.Case('base', 'base', None, '-', 1, base.init, plain(model, base), None)]
  for name, tx in txs.items():
    cases.append(cases_lib.Case(name, 'optax_sam', name, '1call', 1, tx.init, one_call(tx), None))
  msam = optax_sam.momentum_sam(base, rho=0.3)
  cases.append(
    cases_lib.Case('momentum_sam', 'optax_sam', 'msam', '-', 1, msam.init, plain(model, msam), None)
  )
  floor = momentum_norm(base)
  cases.append(
    cases_lib.Case('base+norm(v)', 'base', None, '-', 1, floor.init, plain(model, floor), None)
  )
  return cases


def expected_state_bytes(name: str, param_bytes: int) -> int:
  """DESIGN section 6: no parameter-sized state for when and momentum_sam, one for look_sam."""
  return {
    'base': 0,
    'sam': 0,
    'when/plain': 4,  # the policy's int32 count
    'when/every(5)': 4,
    'look_sam(k=5)': param_bytes + 4,  # the stored direction and the count
    'momentum_sam': 4,  # the float32 scale rho / ||v||
    'base+norm(v)': 4,  # the float32 norm
  }[name]


def measure(model: models.Model, settings: harness.Settings, log=print) -> dict:
  params, model_state = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1))
  p_bytes = models.param_bytes(params)
  runners = [
    harness.Runner(c, params, model_state, batch, settings.compiler_options) for c in build(model)
  ]
  log(f'\n== {model.name}: {model.description}, {p_bytes:,} parameter bytes')
  estimate = {}
  for r in runners:
    r.run(PERIOD * settings.warmup_steps)
    estimate[r.case.name] = r.run(PERIOD)
  steps = PERIOD * max(1, round(settings.measure_s / estimate['base'] / PERIOD))
  round_s = steps * sum(estimate.values())
  rounds = int(np.clip(settings.budget_s // max(round_s, 1e-9), settings.min_rounds, 201))
  log(f'  timing: {rounds} rounds x {steps} steps per case (~{round_s:.2f} s per round)')
  times = harness.interleaved(runners, rounds, steps)
  base_t = np.asarray(times['base'])
  base_arg = next(r for r in runners if r.case.name == 'base').memory['argument']
  cases = {}
  for r in runners:
    t = np.asarray(times[r.case.name])
    ratios = t / base_t
    low, high = harness.bootstrap_ci(ratios)
    delta = r.memory['argument'] - base_arg
    cases[r.case.name] = dict(
      time_ms=float(np.median(t) * 1e3),
      ratio_vs_base=float(np.median(ratios)),
      ci95=[low, high],
      argument_delta_bytes=int(delta),
      expected_state_bytes=expected_state_bytes(r.case.name, p_bytes),
      temp_bytes=r.memory['temp'],
      memory=r.memory,
    )
  return dict(
    name=model.name,
    description=model.description,
    param_bytes=p_bytes,
    rounds=rounds,
    steps=steps,
    cases=cases,
  )


def check(result: dict) -> list:
  lines = []
  for name, c in result['cases'].items():
    if name in TARGETS:
      ok = c['ratio_vs_base'] <= TARGETS[name]
      lines.append(
        f'{"PASS" if ok else "MISS"} {result["name"]} {name}: time {c["ratio_vs_base"]:.3f}x base '
        f'(95% CI {c["ci95"][0]:.3f}-{c["ci95"][1]:.3f}; target <= {TARGETS[name]}x)'
      )
    ok = c['argument_delta_bytes'] == c['expected_state_bytes']
    lines.append(
      f'{"PASS" if ok else "MISS"} {result["name"]} {name}: state {c["argument_delta_bytes"]:,} '
      f'bytes over base (DESIGN: {c["expected_state_bytes"]:,})'
    )
  return lines


def markdown(results: list) -> str:
  return harness.side_table(
    results,
    lambda m: f'{m["param_bytes"]:,} parameter bytes',
    'base',
    [
      ('target', lambda name, c, m: f'<= {TARGETS[name]}x' if name in TARGETS else ''),
      ('state over base (bytes)', lambda name, c, m: f'{c["argument_delta_bytes"]:,}'),
      ('DESIGN', lambda name, c, m: f'{c["expected_state_bytes"]:,}'),
      ('temporaries (bytes)', lambda name, c, m: f'{c["temp_bytes"]:,}'),
    ],
  )


def main(argv=None) -> dict:
  args = harness.side_arguments(__doc__, 'benchmarks/results/cpu-cheap', argv)
  settings = harness.side_settings(args)
  specs = harness.model_specs(args.quick, resnet_batch=harness.default_resnet_batch())
  results, lines = [], []
  for name in args.models.split(','):
    result = measure(specs[name][0], settings)
    results.append(result)
    lines += check(result)
  text = markdown(results) + '\n' + '\n'.join(lines) + '\n'
  harness.save(args.out, 'cheap', argv, results, text)
  return dict(models=results, checks=lines)


if __name__ == '__main__':
  main()
