"""bSAM (optax_sam.bsam): the authors' JAX code step for step, and the wrapper options it takes.

``tests/official/bsam.json`` holds trajectories of team-approx-bayes/bayesian-sam's
``build_bsam_optimizer`` run unmodified in float64 (``tests/official/generate_bsam.py``), with the
same keys: the same draws, so the same numbers.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers

OFFICIAL = json.loads((Path(__file__).parent / 'official' / 'bsam.json').read_text())


def official_problem():
  problem = OFFICIAL['problem']
  params = {k: jnp.asarray(v) for k, v in problem['init_params'].items()}
  x, y = jnp.asarray(problem['x']), jnp.asarray(problem['y'])

  def loss(p, batch):
    bx, by = batch
    out = jnp.tanh((bx @ p['kernel'] + p['bias']) * p['scale'])
    return jnp.mean((out - by) ** 2)

  return params, (x, y), jax.grad(loss)


def official_bsam(case):
  h = case['hyperparameters']
  factors = jnp.asarray(case['lr_factors'])
  return optax_sam.bsam(
    lambda count: h['learningrate'] * factors[count],
    rho=h['rho'],
    beta1=h['beta1'],
    beta2=h['beta2'],
    data_size=h['Ndata'],
    prior_precision=h['wdecay'] * h['Ndata'],
    damping=h['damping'],
    init_precision=h['s_init'],
    seed=case['seed'],
  )


def run(tx, params, grad_fn, steps, step=None):
  step = step or jax.jit(lambda w, s: tx.update(None, s, w, grad_fn=grad_fn))
  state, trajectory = tx.init(params), []
  for _ in range(steps):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    trajectory.append((params, state))
  return trajectory


@pytest.mark.parametrize('route', ['vmap', 'scan'])
@pytest.mark.parametrize('case', OFFICIAL['cases'], ids=[c['name'] for c in OFFICIAL['cases']])
def test_equals_the_authors_code(case, route):
  """Params, momentum, precision and key after each of 5 steps, to 1e-12 in float64."""
  with jax.enable_x64(True):
    params, batch, grad = official_problem()
    groups = case['hyperparameters']['msharpness']
    if groups == 1:
      grad_fn = lambda p: grad(p, batch)
    else:
      grad_fn = optax_sam.micro_batches(grad, batch, len(batch[0]) // groups, route=route)
    tx = official_bsam(case)
    for (w, state), want in zip(run(tx, params, grad_fn, 5), case['steps'], strict=True):
      for name, got in (
        ('params', w),
        ('momentum', state.momentum),
        ('precision', state.precision),
      ):
        expected = {k: np.asarray(v) for k, v in want[name].items()}
        assert helpers.max_diff(got, expected) < 1e-12, name
      assert np.asarray(state.key).tolist() == want['key']


def test_the_noise_and_the_ascent_as_written():
  """One step by hand: sample, precision-scaled ascent, momentum, mean and precision."""
  params, loss, grad_fn = helpers.problem()
  lr, rho, b1, b2, n, prior, damping, s0 = 0.1, 0.05, 0.8, 0.7, 300.0, 6.0, 0.2, 2.0
  tx = optax_sam.bsam(
    lr, rho, b1, b2, data_size=n, prior_precision=prior, damping=damping, init_precision=s0, seed=3
  )
  state = tx.init(params)
  u, new_state = tx.update(None, state, params, grad_fn=grad_fn)
  key = jax.random.split(jax.random.key(3), 2)[0]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves) + 1)[1:]
  noise = treedef.unflatten(
    [jax.random.normal(k, w.shape) for k, w in zip(keys, leaves, strict=True)]
  )
  delta = prior / n
  g = grad_fn(jax.tree.map(lambda w, z: w + z / np.sqrt(n * s0), params, noise))
  g_adv = grad_fn(jax.tree.map(lambda w, x: w + rho * x / s0, params, g))
  m = jax.tree.map(lambda x, w: (1 - b1) * (x + delta * w), g_adv, params)
  assert helpers.max_diff(u, jax.tree.map(lambda x: -lr * x / s0, m)) < 1e-6
  assert helpers.max_diff(new_state.momentum, m) < 1e-6
  s = jax.tree.map(lambda x: b2 * s0 + (1 - b2) * (np.sqrt(s0) * abs(x) + damping + delta), g)
  assert helpers.max_diff(new_state.precision, s) < 1e-6
  assert int(new_state.count) == 1


def test_posterior_samples_have_the_posterior_spread():
  """2000 samples: mean within 4 standard errors of w, spread within 5% of 1 / sqrt(N s)."""
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.bsam(0.1, data_size=50.0)
  state = run(tx, params, grad_fn, 3)[-1][1]
  sigma = optax_sam.posterior_stddev(state)
  assert (
    helpers.max_diff(sigma, jax.tree.map(lambda s: 1 / np.sqrt(50.0 * s), state.precision)) < 1e-6
  )
  samples = optax_sam.posterior_samples(params, state, jax.random.key(0), 2000)
  for w, sd, x in zip(*map(jax.tree.leaves, (params, sigma, samples)), strict=True):
    assert x.shape == (2000, *w.shape)
    assert np.all(np.abs(x.mean(0) - w) < 4 * sd / np.sqrt(2000))
    assert np.all(np.abs(x.std(0) / sd - 1) < 0.05)
  wrapped = optax.chain(optax.identity(), tx).init(params)  # found anywhere in the state
  assert (
    helpers.max_diff(optax_sam.posterior_stddev(wrapped), posterior_stddev_at_init(50.0)) < 1e-6
  )


def posterior_stddev_at_init(n):
  params, _, _ = helpers.problem()
  return jax.tree.map(lambda w: jnp.full(w.shape, 1 / np.sqrt(n)), params)


def test_rho_zero_without_noise_is_an_adam_like_step_on_the_mean():
  """rho = 0 and a huge N (no noise): the gradient at w, the momentum over the precision."""
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.bsam(0.1, rho=0.0, beta1=0.5, data_size=1e12, prior_precision=0.0, damping=0.3)
  state = tx.init(params)
  u, state = tx.update(None, state, params, grad_fn=grad_fn)
  g = grad_fn(params)
  assert helpers.max_diff(u, jax.tree.map(lambda x: -0.1 * 0.5 * x, g)) < 1e-6
  assert (
    helpers.max_diff(state.precision, jax.tree.map(lambda x: 0.999 + 0.001 * (abs(x) + 0.3), g))
    < 1e-6
  )


@pytest.mark.devices(8)
def test_devices_and_groups_give_the_same_step():
  """m-sharpness by groups of 2: 8 devices, 1 device x 8 groups, 2 devices x 4 groups (pmap);
  and one sample for all devices (global) equals the whole batch on one device."""
  params, loss, _ = helpers.problem()
  x, y = helpers.batch(5)
  grad = jax.grad(lambda p, b: loss(p, *b))
  tx = optax_sam.bsam(0.1, rho=0.05, data_size=100.0, seed=1)
  want = run(tx, params, optax_sam.micro_batches(grad, (x, y), 2), 2)[-1][0]

  def pmapped(devices, local, group_size=None):
    tx = optax_sam.bsam(
      0.1, rho=0.05, data_size=100.0, seed=1, axis_name='d', local_perturbation=local
    )

    def update(w, s, x, y):
      if group_size is None:
        fn = lambda p: grad(p, (x, y))
      else:
        fn = optax_sam.micro_batches(grad, (x, y), group_size)
      return tx.update(None, s, w, grad_fn=fn)

    mapped = jax.pmap(update, axis_name='d', in_axes=(None, None, 0, 0))
    shards = lambda a: a.reshape(devices, -1, *a.shape[1:])
    step = lambda w, s: jax.tree.map(lambda a: a[0], mapped(w, s, shards(x), shards(y)))
    return run(tx, params, None, 2, step=step)[-1][0]

  assert helpers.max_diff(pmapped(8, local=True), want) < 1e-6
  assert helpers.max_diff(pmapped(2, local=False, group_size=2), want) < 1e-6
  whole = run(tx, params, lambda p: grad(p, (x, y)), 2)[-1][0]
  assert helpers.max_diff(pmapped(4, local=False), whole) < 1e-6


def test_inject_hyperparams_and_bf16_params():
  params, _, grad_fn = helpers.problem()
  injected = optax.inject_hyperparams(optax_sam.bsam)(0.1, rho=0.05, data_size=100.0)
  fixed = optax_sam.bsam(0.1, rho=0.02, data_size=100.0)
  state, fixed_state, w = injected.init(params), fixed.init(params), params
  state.hyperparams['rho'] = jnp.asarray(0.02)
  for _ in range(2):
    got, state = injected.update(None, state, w, grad_fn=grad_fn)
    want, fixed_state = fixed.update(None, fixed_state, w, grad_fn=grad_fn)
    assert helpers.max_diff(got, want) < 1e-7
    w = optax.apply_updates(w, got)

  tx = optax_sam.bsam(0.1, data_size=100.0)
  low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(tx.init(low).precision))
  helpers.assert_bf16_steps(tx, params, grad_fn)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'two_phase': True}, 'bsam does not take two_phase'),
    ({'when': optax_sam.every(2)}, 'bsam does not take when'),
    ({'statistics': True}, 'bsam does not take statistics'),
    ({'data_size': 0.0}, 'data_size'),
    ({'beta2': 1.5}, 'beta2'),
    ({'rho': -0.1}, 'rho'),
    ({'init_precision': 0.0}, 'init_precision'),
    ({'local_perturbation': True}, 'needs axis_name'),
  ],
)
def test_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_sam.bsam(0.1, **{'data_size': 10.0, **kwargs})


def test_clear_errors_at_the_call():
  params, _, _ = helpers.problem()
  tx = optax_sam.bsam(0.1, data_size=10.0)
  with pytest.raises(TypeError, match='needs grad_fn'):
    tx.update(None, tx.init(params), params)
  with pytest.raises(ValueError, match='no bSAM state'):
    optax_sam.posterior_stddev(optax.sgd(0.1).init(params))
  with pytest.raises(TypeError, match='precision_ascent divides by the posterior precision'):
    optax_sam.precision_ascent(0.1).update(params, optax.EmptyState(), params)


def test_the_benchmarks_hand_written_step_is_the_alias_step():
  """benchmarks.run's ``ref/bsam`` (the math written out, the same key splits) equals the alias
  with the benchmarks' settings."""
  from types import SimpleNamespace  # noqa: PLC0415

  from benchmarks import cases, references  # noqa: PLC0415 - the benchmarks are not the library

  params, loss, _ = helpers.problem()
  x, y = helpers.batch(5)
  model = SimpleNamespace(loss=lambda p, model_state, batch: (loss(p, *batch), model_state))
  init, step = references.bsam_step(model, None)
  (variant,) = [v for v in cases.VARIANTS if v.name == 'bsam']
  tx = variant.build(None, False)
  grad_fn = jax.grad(lambda w: loss(w, x, y))
  state, reference_state, w, reference_w = tx.init(params), init(params), params, params
  for _ in range(3):
    updates, state = tx.update(None, state, w, grad_fn=grad_fn)
    w = optax.apply_updates(w, updates)
    reference_w, reference_state, _, _ = step(reference_w, reference_state, None, (x, y))
    assert helpers.max_diff(w, reference_w) < 1e-6
  assert helpers.max_diff(w, params) > 1e-3
