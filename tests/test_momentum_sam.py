"""Momentum-SAM against the NumPy re-implementation of the reference code, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers, reference_cheap


def _problem64():
  params, _, grad_fn = helpers.problem(jnp.float64)
  return params, grad_fn


def _numpy_grad64(grad_fn):
  def g(w):
    out = grad_fn({k: jnp.asarray(v, jnp.float64) for k, v in w.items()})
    return {k: np.asarray(v, np.float64) for k, v in out.items()}

  return g


def _run(tx, params, grad_fn, steps):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p))
  held = []
  for _ in range(steps):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    held.append((params, optax_sam.clean_params(params, state)))
  return held, state


def test_sgd_matches_reference_step_for_step():
  with jax.enable_x64(True):
    params, grad_fn = _problem64()
    tx = optax_sam.momentum_sam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    held, _ = _run(tx, params, grad_fn, 8)
    w = {k: np.asarray(v) for k, v in params.items()}
    ref = reference_cheap.ReferenceMSAM(_numpy_grad64(grad_fn), w, lr=0.1, momentum=0.9, rho=0.3)
    for got_held, got_clean in held:
      w = ref.step(w)
      assert helpers.max_diff(got_held, w) < 1e-12
      assert helpers.max_diff(got_clean, ref.clean(w)) < 1e-12
    assert helpers.max_diff(w, params) > 0.1  # the run moved


@pytest.mark.parametrize('rho', [0.0, 0.5])
def test_adam_matches_reference_step_for_step(rho):
  with jax.enable_x64(True):
    params, grad_fn = _problem64()
    tx = optax_sam.momentum_sam(optax.adam(0.01), rho=rho)
    held, _ = _run(tx, params, grad_fn, 8)
    w = {k: np.asarray(v) for k, v in params.items()}
    ref = reference_cheap.ReferenceAdamWMSAM(_numpy_grad64(grad_fn), w, lr=0.01, rho=rho)
    for got_held, got_clean in held:
      w = ref.step(w)
      assert helpers.max_diff(got_held, w) < 1e-12
      assert helpers.max_diff(got_clean, ref.clean(w)) < 1e-12


def test_adamw_runs_the_base_at_the_clean_weights():
  """optax.adamw's decay acts on the clean w: the clean weights follow adamw on g(held)."""
  params, _, grad_fn = helpers.problem()
  base = optax.adamw(0.01, weight_decay=0.1)
  tx = optax_sam.momentum_sam(base, rho=0.2)
  state, base_state, held, clean = tx.init(params), base.init(params), params, params
  for _ in range(5):
    g = grad_fn(held)
    u, state = tx.update(g, state, held)
    held = optax.apply_updates(held, u)
    bu, base_state = base.update(g, base_state, clean)
    clean = optax.apply_updates(clean, bu)
    assert helpers.max_diff(optax_sam.clean_params(held, state), clean) < 1e-6
  v = base_state[0].mu
  norm = float(optax.tree.norm(v))
  want = jax.tree.map(lambda w, m: w - 0.2 * m / norm, clean, v)
  assert helpers.max_diff(held, want) < 1e-6


def test_rho_zero_is_the_base_optimizer():
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  held, _ = _run(optax_sam.momentum_sam(base, rho=0.0), params, grad_fn, 4)
  state, w = base.init(params), params
  for _ in range(4):
    u, state = base.update(grad_fn(w), state, w)
    w = optax.apply_updates(w, u)
  assert helpers.max_diff(held[-1][0], w) < 1e-6  # jit against eager: float rounding


def test_no_parameter_sized_state_beyond_the_base():
  params, _, _ = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  state = optax_sam.momentum_sam(base).init(params)
  size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  assert size(state) == size(base.init(params)) + 1


def test_works_in_a_chain_and_under_inject_hyperparams():
  params, _, grad_fn = helpers.problem()
  base = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
  plain = optax_sam.momentum_sam(base, rho=0.3)
  injected = optax.inject_hyperparams(optax_sam.momentum_sam, static_args=('base_optimizer',))(
    base_optimizer=base, rho=0.3
  )
  a, sa = _run(plain, params, grad_fn, 3)
  b, sb = _run(injected, params, grad_fn, 3)
  assert helpers.max_diff(a[-1][0], b[-1][0]) < 1e-6
  assert helpers.max_diff(a[-1][1], optax_sam.clean_params(b[-1][0], sb)) < 1e-6


def test_bfloat16_params_keep_their_dtype():
  params, _, grad_fn = helpers.problem(jnp.bfloat16)
  held, state = _run(optax_sam.momentum_sam(optax.adam(0.01)), params, grad_fn, 2)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(held[-1]))
  assert state.scale.dtype == jnp.float32


@pytest.mark.parametrize(
  'base', [lambda: optax.sgd(0.1), lambda: optax.rmsprop(0.1), lambda: optax.adagrad(0.1)]
)
def test_a_base_without_momentum_is_a_value_error(base):
  with pytest.raises(ValueError, match='base_optimizer must have momentum'):
    optax_sam.momentum_sam(base())


@pytest.mark.parametrize('name, value', [('rho', -0.1), ('eps', -1.0)])
def test_bad_hyperparameters(name, value):
  with pytest.raises(ValueError, match=f'{name} must be >= 0'):
    optax_sam.momentum_sam(optax.sgd(0.1, momentum=0.9), **{name: value})
