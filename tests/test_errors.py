"""Bad input: clear errors at construction and at the first update."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers

BASE = optax.sgd(0.1)


@pytest.mark.parametrize(
  'factory, kwargs, name, allowed',
  [
    (optax_sam.sam, dict(rho=-0.1), 'rho', '>= 0'),
    (optax_sam.sam, dict(eps=-1.0), 'eps', '>= 0'),
    (optax_sam.sam, dict(adaptive=True, eta=-0.5), 'eta', '>= 0'),
    (optax_sam.asam, dict(eta=-0.5), 'eta', '>= 0'),
    (optax_sam.friendly_sam, dict(sigma=1.5), 'sigma', 'in [0.0, 1.0]'),
    (optax_sam.friendly_sam, dict(sigma=-0.1), 'sigma', 'in [0.0, 1.0]'),
    (optax_sam.friendly_sam, dict(lmbda=2.0), 'lmbda', 'in [0.0, 1.0]'),
    (optax_sam.stable_sam, dict(rho=-1.0), 'rho', '>= 0'),
    (optax_sam.gsam, dict(alpha=-0.4), 'alpha', '>= 0'),
    (optax_sam.gsam, dict(rho=jnp.asarray(-1.0)), 'rho', '>= 0'),
  ],
)
def test_bad_hyperparameters_name_the_parameter_and_range(factory, kwargs, name, allowed):
  with pytest.raises(ValueError) as info:
    factory(BASE, **kwargs)
  message = str(info.value)
  assert message.startswith(name) and allowed in message


def test_unknown_option_is_a_type_error_and_signatures_are_explicit():
  with pytest.raises(TypeError, match='unexpected keyword'):
    optax_sam.sam(BASE, sigma=0.5)
  aliases = (
    optax_sam.sam,
    optax_sam.asam,
    optax_sam.friendly_sam,
    optax_sam.stable_sam,
    optax_sam.gsam,
  )
  for alias in aliases:
    kinds = {p.kind for p in inspect.signature(alias).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
  with pytest.raises(ValueError, match='axis_name'):
    optax_sam.sam(BASE, local_perturbation=True)


def test_missing_grad_fn_says_what_to_pass():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.sam(BASE)
  with pytest.raises(TypeError, match=r'grad_fn=lambda p: .*two_phase=True'):
    tx.update(grad_fn(params), tx.init(params), params)
  with pytest.raises(ValueError, match='params'):
    tx.update(grad_fn(params), tx.init(params), None, grad_fn=grad_fn)


def test_grad_fn_with_wrong_structure_or_shape():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.friendly_sam(BASE)
  state = tx.init(params)
  with pytest.raises(TypeError, match='structure of params'):
    tx.update(grad_fn(params), state, params, grad_fn=lambda p: grad_fn(p)['kernel'])
  wrong_shape = lambda p: {'kernel': jnp.zeros((3, 5)), 'bias': jnp.zeros(3)}
  with pytest.raises(ValueError, match='shape'):
    jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=wrong_shape))(grad_fn(params), state, params)


def test_traced_hyperparameters_are_accepted():
  params, _, grad_fn = helpers.problem()

  @jax.jit
  def step(rho, sigma):
    tx = optax_sam.friendly_sam(BASE, rho=rho, sigma=sigma)
    return tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]

  got = step(0.1, 0.5)
  tx = optax_sam.friendly_sam(BASE, rho=0.1, sigma=0.5)
  want = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]
  assert helpers.max_diff(got, want) < 1e-7


def test_nan_in_an_untaken_branch_does_not_leak():
  """At F-SAM's first step the EMA is not read: even a non-finite buffer must not reach e."""
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.friendly_sam(BASE, sigma=0.5)
  state = tx.init(params)
  direction_state, ascent_state = state.perturbation_state
  poisoned = direction_state._replace(ema=jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), params))
  state = state._replace(perturbation_state=(poisoned, ascent_state))
  u, new_state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  for leaf in jax.tree.leaves((u, new_state)):
    assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize(
  'make',
  [optax_sam.sam, optax_sam.stable_sam, optax_sam.gsam, optax_sam.friendly_sam],
  ids=['sam', 'stable', 'gsam', 'fsam'],
)
def test_huge_finite_gradients_stay_finite(make):
  """Squares of 1e20 overflow float32; norms and dot products must not turn them into inf/NaN."""
  w = jnp.zeros(2)
  g = jnp.array([1e20, -1e20], jnp.float32)
  tx = make(optax.sgd(1e-21), rho=0.1)
  updates, state = tx.update(g, tx.init(w), w, grad_fn=lambda p: g)
  for leaf in jax.tree.leaves((updates, state)):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  e, _ = optax_sam.ascent(0.1).update(g, optax.EmptyState(), w)
  np.testing.assert_allclose(float(jnp.linalg.norm(e)), 0.1, rtol=1e-6)
  c = optax_sam.gsam_correction(alpha=0.5)
  g_adv = jnp.array([2e20, 0.0], jnp.float32)
  # g's component orthogonal to g_adv is [0, -1e20]: g_sam = g_adv - 0.5 [0, -1e20].
  np.testing.assert_allclose(c.apply(c.prepare(g, w), g_adv, w), [2e20, 0.5e20], rtol=1e-6)
