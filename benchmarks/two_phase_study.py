"""Where two-phase SAM's extra cost comes from: ``lax.cond`` against ``jnp.where`` selection.

Run from the repository root::

  python -m benchmarks.two_phase_study --model mlp --rounds 50

optax_sam's two-phase update picks the ascent or the descent with
``jax.lax.cond``. The outputs of an XLA conditional cannot be written into the
donated argument buffers, so on a model whose parameters are large next to its
activations (an MLP) the step holds parameter-sized temporaries and copies the
base optimizer's state back. This script compares, for plain SAM with the same
base optimizer, the library's step with two hand-written alternatives that
select with ``jnp.where`` (both branches' elementwise work is done each call):

* ``where``: the new weights and the new clean copy both read the old weights
  and the old copy, so XLA copies params, copy and momentum on entry;
* ``where-ordered``: the clean copy is selected first and the descent target is
  computed from the selected copy, so no in-place output reads a buffer that
  another output has already overwritten.

It prints temporaries (in units of the parameter bytes ``P``), the number of
``copy`` instructions in the compiled HLO and the median time per SAM step
relative to the minimal one-call step, from interleaved rounds.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import cases as cases_lib
from benchmarks import harness, models


def _where_two_phase(model: models.Model, ordered: bool):
  """Two-phase SAM written with ``jnp.where``; state: ``(phase, clean weights, base state)``."""
  base = cases_lib.base_optimizer()
  value_and_grad = jax.value_and_grad(model.loss, has_aux=True)

  def init(params):
    return jnp.zeros([], jnp.int32), params, base.init(params)

  def step(params, opt_state, model_state, batch):
    phase, clean, base_state = opt_state
    (loss, new_model_state), grads = value_and_grad(params, model_state, batch)
    ascent = phase == 0
    scale = cases_lib.RHO / (optax.tree.norm(grads) + cases_lib.EPS)
    select = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ascent, x, y), a, b)
    if ordered:
      new_clean = select(params, clean)
      base_updates, new_base_state = base.update(grads, base_state, new_clean)
      updates = jax.tree.map(
        lambda w, c, g, u: jnp.where(ascent, scale * g, c + u - w),
        params,
        new_clean,
        grads,
        base_updates,
      )
      new_params = optax.apply_updates(params, updates)
    else:
      base_updates, new_base_state = base.update(grads, base_state, clean)
      new_params = jax.tree.map(
        lambda w, c, g, u: jnp.where(ascent, w + scale * g, c + u),
        params,
        clean,
        grads,
        base_updates,
      )
      new_clean = select(params, clean)
    new_base_state = select(base_state, new_base_state)
    return new_params, (1 - phase, new_clean, new_base_state), new_model_state, loss

  return init, step


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', choices=('mlp', 'cnn'), default='mlp')
  parser.add_argument('--rounds', type=int, default=50)
  args = parser.parse_args(argv)
  model = models.mlp(width=512) if args.model == 'mlp' else models.cnn1d(channels=64)
  params, model_state = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1))
  p_bytes = models.param_bytes(params)
  named = {c.name: c for c in cases_lib.build_cases(model, p_bytes, with_references=False)}
  studied = [named[n] for n in ('base', 'minimal', 'sam/1call', 'sam/2phase')]
  for name, ordered in (('where', False), ('where-ordered', True)):
    init, step = _where_two_phase(model, ordered)
    studied.append(cases_lib.Case(name, 'study', 'sam', '2phase', 2, init, step, None))
  studied.append(named['contrib/transparent'])
  runners = [harness.Runner(c, params, model_state, batch) for c in studied]
  for r in runners:
    r.run(1)
  steps = max(1, round(0.05 / runners[1].run(1)))
  times = harness.interleaved(runners, args.rounds, steps)
  print(f'{model.name}: P = {p_bytes:,} bytes, {args.rounds} rounds of {steps} SAM steps')
  print('| step | temp / P | HLO copies | ms / SAM step | x minimal [95% CI] |')
  print('|---|---:|---:|---:|---|')
  reference = np.asarray(times['minimal'])
  for r in runners:
    t = np.asarray(times[r.case.name])
    ratios = t / reference
    low, high = harness.bootstrap_ci(ratios)
    print(
      f'| {r.case.name} | {r.memory["temp"] / p_bytes:.2f} | '
      f'{r.compiled.as_text().count(" copy(")} | {np.median(t) * 1e3:.2f} | '
      f'{np.median(ratios):.3f} [{low:.3f}, {high:.3f}] |'
    )


if __name__ == '__main__':
  main()
