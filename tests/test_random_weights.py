"""m-RWP: the same update as the formula given the same noise, and the noise's scale."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers


def draws(seed: int, params, steps: int) -> list:
  """The standard normals the perturbation draws at each step, replayed from its key schedule."""
  key, out = jax.random.key(seed), []
  leaves, treedef = jax.tree.flatten(params)
  for _ in range(steps):
    key, draw = jax.random.split(key)
    keys = jax.random.split(draw, len(leaves))
    normals = [
      jax.random.normal(k, w.shape, jnp.float32) for k, w in zip(keys, leaves, strict=True)
    ]
    out.append(jax.tree.unflatten(treedef, normals))
  return out


def filter_norms(w):
  if w.ndim <= 1:
    return jnp.linalg.norm(w) + 1e-16
  return jnp.linalg.norm(w, axis=tuple(range(w.ndim - 1)), keepdims=True)


@pytest.mark.parametrize('two_phase', [False, True])
def test_equals_the_formula_given_the_same_noise(two_phase):
  """(1 - lmbda) g + lmbda grad L(w + e), e = sigma ||W_i|| z per output filter, every step."""
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax_sam.mrwp(base, sigma=0.2, lmbda=0.3, seed=4, two_phase=two_phase)
  state, w = tx.init(params), params
  base_state, v = base.init(params), params
  for z in draws(4, params, 3):
    for _ in range(2 if two_phase else 1):
      u, state = tx.update(grad_fn(w), state, w, **helpers.grad_fn_for(state, grad_fn))
      w = optax.apply_updates(w, u)
    e = jax.tree.map(lambda x, n: 0.2 * filter_norms(x) * n, v, z)
    g_adv = grad_fn(jax.tree.map(jnp.add, v, e))
    mixed = jax.tree.map(lambda a, b: 0.7 * a + 0.3 * b, grad_fn(v), g_adv)
    want, base_state = base.update(mixed, base_state, v)
    v = optax.apply_updates(v, want)
    assert helpers.max_diff(w, v) < 1e-6


def test_the_noise_has_the_filters_scale():
  """Over 4000 entries per filter the sample std is sigma ||W_i|| within 5 %; a vector's is
  sigma ||v||; draws change from step to step and follow the seed."""
  k1, k2 = jax.random.split(jax.random.key(0))
  scales = jnp.array([0.5, 1.0, 2.0, 4.0])
  params = {'kernel': jax.random.normal(k1, (4000, 4)) * scales, 'bias': jnp.full((5000,), 0.3)}
  tx = optax_sam.random_perturbation(sigma=0.1, seed=1)
  state = tx.init(params)
  e1, state = tx.update(params, state, params)
  e2, _ = tx.update(params, state, params)
  norms = jnp.linalg.norm(params['kernel'], axis=0)
  np.testing.assert_allclose(jnp.std(e1['kernel'], axis=0), 0.1 * norms, rtol=0.05)
  np.testing.assert_allclose(jnp.mean(e1['kernel'], axis=0), 0, atol=4 * 0.1 * norms.max() / 63)
  np.testing.assert_allclose(jnp.std(e1['bias']), 0.1 * jnp.linalg.norm(params['bias']), rtol=0.05)
  assert helpers.max_diff(e1, e2) > 0.01
  again, _ = tx.update(params, tx.init(params), params)
  assert helpers.max_diff(e1, again) == 0
  other = optax_sam.random_perturbation(sigma=0.1, seed=2)
  assert helpers.max_diff(other.update(params, other.init(params), params)[0], e1) > 0.01
  # PyTorch's orientation: the filters along axis 0.
  torch_like = optax_sam.random_perturbation(sigma=0.1, output_axes=(0,))
  e, _ = torch_like.update(params, torch_like.init(params), params)
  rows = jnp.linalg.norm(params['kernel'], axis=1)
  np.testing.assert_allclose(jnp.std(e['kernel'] / rows[:, None]), 0.1, rtol=0.05)


def test_sigma_zero_and_lambda_one_is_the_base_optimizer_and_errors():
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax_sam.mrwp(base, sigma=0.0, lmbda=1.0)
  u, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  want, _ = base.update(grad_fn(params), base.init(params), params)
  assert helpers.max_diff(u, want) < 1e-7
  with pytest.raises(ValueError, match='sigma'):
    optax_sam.mrwp(base, sigma=-1.0)
  with pytest.raises(ValueError, match='lmbda'):
    optax_sam.mrwp(base, lmbda=1.5)
  noise = optax_sam.random_perturbation()
  with pytest.raises(ValueError, match='needs|call update'):
    noise.update(params, noise.init(params))


@pytest.mark.devices(8)
def test_every_device_draws_the_same_noise():
  """Under pmap with axis_name the replicated key gives one perturbation: the whole batch's step."""
  params, loss, _ = helpers.problem()
  x, y = helpers.batch(4)
  grad = jax.grad(lambda p, x, y: loss(p, x, y))
  single = optax_sam.mrwp(optax.sgd(0.1), sigma=0.3)
  want, _ = single.update(
    grad(params, x, y), single.init(params), params, grad_fn=lambda p: grad(p, x, y)
  )
  tx = optax_sam.mrwp(optax.sgd(0.1), sigma=0.3, axis_name='d')

  def step(params, x, y):
    return tx.update(grad(params, x, y), tx.init(params), params, grad_fn=lambda p: grad(p, x, y))[
      0
    ]

  shards = lambda a: a.reshape(8, 2, *a.shape[1:])
  got = jax.pmap(step, axis_name='d', in_axes=(None, 0, 0))(params, shards(x), shards(y))
  assert helpers.max_diff(jax.tree.map(lambda a: a[0], got), want) < 1e-6


def test_the_benchmarks_hand_written_step_is_the_alias_step():
  """benchmarks.run's ``ref/mrwp`` (the math written out, the same key splits) equals ``mrwp``."""
  from types import SimpleNamespace  # noqa: PLC0415

  from benchmarks import references  # noqa: PLC0415 - the benchmarks are not the library

  def loss(p, model_state, batch):
    x, y = batch
    hidden = jnp.tanh(x @ p['dense']['kernel'] + p['dense']['bias'])
    return jnp.mean((hidden @ p['out'] - y) ** 2), model_state

  k = jax.random.split(jax.random.key(0), 5)
  params = {
    'dense': {'kernel': jax.random.normal(k[0], (4, 8)), 'bias': jax.random.normal(k[1], (8,))},
    'out': jax.random.normal(k[2], (8, 2)),
  }
  batch = (jax.random.normal(k[3], (16, 4)), jax.random.normal(k[4], (16, 2)))
  base = optax.sgd(0.1, momentum=0.9)
  init, step = references.reference_step(SimpleNamespace(loss=loss), base, references.MATH['mrwp'])
  tx = optax_sam.mrwp(base)
  grad_fn = jax.grad(lambda w: loss(w, None, batch)[0])
  state, reference_state, w, reference_w = tx.init(params), init(params), params, params
  for _ in range(3):
    updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
    w = optax.apply_updates(w, updates)
    reference_w, reference_state, _, _ = step(reference_w, reference_state, None, batch)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(reference_w), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert not np.allclose(w['out'], params['out'])
