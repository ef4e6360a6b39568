"""skip_nonfinite: a step whose clean or perturbed pass is not finite leaves all as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers


def nan_like(tree):
  return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tree)


def step(tx, params, state, g, grad_fn=None):
  extra = {} if grad_fn is None else helpers.grad_fn_for(state, grad_fn)
  u, state = tx.update(g, state, params, **extra)
  return optax.apply_updates(params, u), state, u


def assert_same(a, b, rtol=0.0, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_apply_if_finite_misses_a_nan_of_the_perturbed_pass():
  """Why the guard exists: optax's checks the gradient it receives, the clean one."""
  params, _, grad_fn = helpers.problem()
  tx = optax.apply_if_finite(optax_sam.friendly_sam(optax.sgd(0.1)), max_consecutive_errors=5)
  state = tx.init(params)
  bad = lambda p: nan_like(grad_fn(p))  # the perturbed pass overflows, the clean one does not
  u, state = tx.update(grad_fn(params), state, params, grad_fn=bad)
  assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(u))
  assert int(state.notfinite_count) == 0


@pytest.mark.parametrize('where', ['clean', 'perturbed'])
@pytest.mark.parametrize('name', sorted(helpers.VARIANTS))
def test_a_skipped_step_is_as_if_it_never_happened(name, where):
  """Guarded A, NaN, C equals unguarded A, C: the weights and every part of the state."""
  params, _, grad_fn = helpers.problem()
  variant = helpers.VARIANTS[name]
  plain = variant.make(optax.sgd(0.1, momentum=0.9))
  guarded = optax_sam.skip_nonfinite(variant.make(optax.sgd(0.1, momentum=0.9)))
  one_call = name != 'msam'  # Momentum-SAM takes no grad_fn: its only pass is the clean one
  if where == 'perturbed' and not one_call:
    pytest.skip('Momentum-SAM has no perturbed pass of its own')
  fn = grad_fn if one_call else None
  bad_g, bad_fn = (nan_like(grad_fn(params)), fn) if where == 'clean' else (None, None)

  # LookSAM (k = 2) takes its perturbed pass on every other step: the NaN step is one of those.
  before = 2 if name == 'looksam' else 1

  @jax.jit
  def run(params):
    p, s = params, plain.init(params)
    for _ in range(before + 1):
      p, s, _ = step(plain, p, s, grad_fn(p), fn)
    q, t = params, guarded.init(params)
    for _ in range(before):
      q, t, _ = step(guarded, q, t, grad_fn(q), fn)
    g = bad_g if bad_g is not None else grad_fn(q)
    perturbed_fn = bad_fn if where == 'clean' else (lambda w: nan_like(grad_fn(w)))
    q2, t2, u = step(guarded, q, t, g, perturbed_fn)
    q3, t3, _ = step(guarded, q2, t2, grad_fn(q2), fn)
    return p, s, q, q2, u, q3, t3

  p, s, q, q2, u, q3, t3 = run(params)
  assert_same(u, jax.tree.map(jnp.zeros_like, u))
  assert_same(q2, q)
  # To rounding: the guarded and the plain programs are the same arithmetic, which XLA:CPU fuses
  # differently in the two (a multiply-add contracted in one and not the other, depending on the
  # fusion emitter: conftest.py's), and LookSAM's and WSAM's state subtract nearly equal terms.
  # A step taken on the NaN gradient, or any part of it kept in the state, moves the weights and
  # momenta by lr |g| (1.7e-4 to 2.6e-2 per entry here), far beyond that.
  assert_same(q3, p, rtol=1e-5, atol=1e-6)
  assert_same(t3.inner_state, s, rtol=1e-5, atol=1e-6)
  assert int(optax_sam.skipped_steps(t3)) == 1
  assert int(t3.consecutive_skips) == 0 and bool(t3.last_finite)


@pytest.mark.parametrize('name', ['sam', 'fsam'])
def test_two_phase_a_skipped_second_call_waits_at_the_perturbed_weights(name):
  """The next call, at w + e, completes the step the skipped call could not."""
  params, _, grad_fn = helpers.problem()
  make = lambda: helpers.VARIANTS[name].make(optax.adam(0.01), two_phase=True)
  plain, guarded = make(), optax_sam.skip_nonfinite(make())
  p, s, _ = step(plain, params, plain.init(params), grad_fn(params))
  perturbed = p
  p, s, _ = step(plain, p, s, grad_fn(p))
  q, t, _ = step(guarded, params, guarded.init(params), grad_fn(params))
  q, t, u = step(guarded, q, t, nan_like(params))
  assert_same(q, perturbed)
  assert bool(optax_sam.is_perturbed(t))
  assert_same(optax_sam.clean_params(q, t), params)
  q, t, _ = step(guarded, q, t, grad_fn(q))
  assert_same(q, p)
  assert_same(t.inner_state, s)
  assert not bool(optax_sam.is_perturbed(t))


def test_friendly_sam_survives_a_nan_and_keeps_training():
  """F-SAM's EMA stays finite and the loss keeps falling after NaN batches."""
  params, loss, grad_fn = helpers.problem()
  tx = optax_sam.skip_nonfinite(optax_sam.friendly_sam(optax.sgd(0.1, momentum=0.9), rho=0.05))
  state = tx.init(params)
  call = jax.jit(lambda p, s, g: step(tx, p, s, g, grad_fn)[:2])
  start = float(loss(params))
  for i in range(30):
    g = nan_like(params) if i in (3, 10, 11) else grad_fn(params)
    params, state = call(params, state, g)
  ema = optax.tree.get(state, 'ema')
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(ema))
  assert int(optax_sam.skipped_steps(state)) == 3
  assert float(loss(params)) < 0.8 * start


def test_statistics_and_clean_params_read_through_the_guard():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.skip_nonfinite(optax_sam.sam(optax.sgd(0.1), statistics=True))
  state = tx.init(params)
  _, state, _ = step(tx, params, state, grad_fn(params), grad_fn)
  stats = optax_sam.step_statistics(state)
  assert float(stats.grad_norm) > 0
  assert_same(optax_sam.clean_params(params, state), params)


def test_max_consecutive_skips_lets_a_hopeless_run_show_its_nan():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.skip_nonfinite(optax_sam.sam(optax.sgd(0.1)), max_consecutive_skips=2)
  state = tx.init(params)
  applied = []
  for _ in range(4):
    u, state = tx.update(nan_like(params), state, params, grad_fn=grad_fn)
    applied.append(bool(jnp.isnan(u['bias'][0])))
  assert applied == [False, False, True, True]
  assert int(optax_sam.skipped_steps(state)) == 2
  assert int(state.consecutive_skips) == 4


def test_skipped_steps_needs_the_guard():
  params, _, _ = helpers.problem()
  with pytest.raises(ValueError, match='skip_nonfinite'):
    optax_sam.skipped_steps(optax_sam.sam(optax.sgd(0.1)).init(params))


def test_the_optimizer_must_be_an_optax_transformation():
  with pytest.raises(TypeError, match=r'optimizer must be an Optax transformation.*got 0.1'):
    optax_sam.skip_nonfinite(0.1)
