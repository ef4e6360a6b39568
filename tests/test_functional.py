"""Functional-SAM's grad_fn and the preconditioned ascent, against the formulas written out."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_sam
import optax_sam.flax
from tests import helpers


def mlp_problem():
  """A 2-layer MLP's logits on 8 examples, 3 classes; float64 for exact comparisons."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k1, (8, 4), jnp.float64)
  y = jax.random.randint(k2, (8,), 0, 3)
  params = {
    'w1': 0.5 * jax.random.normal(k3, (4, 5), jnp.float64),
    'w2': 0.5 * jax.random.normal(k4, (5, 3), jnp.float64),
  }
  output_fn = lambda p: jnp.tanh(x @ p['w1']) @ p['w2']
  output_loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return params, output_fn, output_loss


def dense_functional_gradient(output_fn, output_loss, clean, perturbed):
  """J(w')^T dl/df(w) with the Jacobian as a dense matrix (flattened params and outputs)."""
  flat, unravel = jax.flatten_util.ravel_pytree(perturbed)
  jacobian = jax.jacrev(lambda v: output_fn(unravel(v)).ravel())(flat)
  output_grad = jax.grad(output_loss)(output_fn(clean)).ravel()
  return unravel(jacobian.T @ output_grad)


def test_functional_grad_fn_is_the_jacobian_there_times_the_clean_output_gradient():
  with jax.enable_x64(True):
    params, output_fn, output_loss = mlp_problem()
    loss, grads, grad_fn = optax_sam.functional_value_and_grad(output_fn, output_loss, params)
    full_loss = lambda p: output_loss(output_fn(p))
    assert float(loss) == pytest.approx(float(full_loss(params)), rel=1e-14)
    assert helpers.max_diff(grads, jax.grad(full_loss)(params)) < 1e-14
    assert helpers.max_diff(grad_fn(params), grads) < 1e-14  # at w, both paths are the gradient
    perturbed = jax.tree.map(lambda p: p + 0.3 * jnp.sign(p), params)
    want = dense_functional_gradient(output_fn, output_loss, params, perturbed)
    assert helpers.max_diff(grad_fn(perturbed), want) < 1e-12
    # The logit path is what SAM adds: the full gradient there differs.
    assert helpers.max_diff(jax.grad(full_loss)(perturbed), want) > 1e-3


def test_functional_sam_step_equals_sam_written_with_the_functional_gradient():
  with jax.enable_x64(True):
    params, output_fn, output_loss = mlp_problem()
    base = optax.adamw(0.01, weight_decay=0.1)
    tx = optax_sam.sam(base, rho=0.2)
    state, w = tx.init(params), params
    base_state, v = base.init(params), params
    for _ in range(3):
      _, grads, grad_fn = optax_sam.functional_value_and_grad(output_fn, output_loss, w)
      u, state = tx.update(grads, state, w, grad_fn=grad_fn)
      w = optax.apply_updates(w, u)
      g = jax.grad(lambda p: output_loss(output_fn(p)))(v)
      scale = 0.2 / (optax.tree.norm(g) + 1e-12)
      e = jax.tree.map(lambda x, s=scale: s * x, g)
      perturbed = jax.tree.map(jnp.add, v, e)
      g_fsam = dense_functional_gradient(output_fn, output_loss, v, perturbed)
      u2, base_state = base.update(g_fsam, base_state, v)
      v = optax.apply_updates(v, u2)
      assert helpers.max_diff(w, v) < 1e-12


class Net(nnx.Module):
  def __init__(self, rngs):
    self.linear1 = nnx.Linear(4, 6, rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.linear2 = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.linear2(self.dropout(nnx.relu(self.norm(self.linear1(x)))))


def test_nnx_functional_gradient_equals_the_plain_function_version():
  """Same numbers as functional_value_and_grad on the model's pure function; the model keeps the
  clean pass's BatchNorm statistics and RNG count; the perturbed pass reuses the dropout mask."""
  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
  output_loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  model = Net(nnx.Rngs(0, dropout=1))
  twin = Net(nnx.Rngs(0, dropout=1))
  loss, grads, grad_fn = optax_sam.flax.nnx_functional_value_and_grad(
    lambda m, x: m(x), output_loss, model, x
  )
  # The same clean pass by nnx.value_and_grad on the twin: value, gradient, state after.
  want_loss, want_grads = nnx.value_and_grad(lambda m: output_loss(m(x)))(twin)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
  assert helpers.max_diff(nnx.as_pure(grads), nnx.as_pure(want_grads)) < 1e-6
  assert (
    helpers.max_diff(
      nnx.as_pure(nnx.state(model, nnx.BatchStat)), nnx.as_pure(nnx.state(twin, nnx.BatchStat))
    )
    == 0
  )
  assert int(model.dropout.rngs.count[...]) == int(twin.dropout.rngs.count[...]) == 1
  # grad_fn against the pure function of the model before the clean pass (same dropout keys).
  fresh = Net(nnx.Rngs(0, dropout=1))
  graphdef, params, rest = nnx.split(fresh, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def output_fn(p):
    copy = nnx.merge(graphdef, p, rest)
    return copy(x)

  _, plain_grads, plain_grad_fn = optax_sam.functional_value_and_grad(
    output_fn, output_loss, params
  )
  perturbed = jax.tree.map(lambda p: p + 0.1, params)
  assert helpers.max_diff(grad_fn(perturbed), plain_grad_fn(perturbed)) < 1e-6
  assert helpers.max_diff(plain_grads, nnx.as_pure(grads)) < 1e-6
  # And a step through nnx.Optimizer runs.
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.adam(0.01)), wrt=nnx.Param)
  optimizer.update(model, grads, grad_fn=grad_fn)


# ----------------------------------------------------------------------- preconditioned ascent


def test_preconditioned_ascent_is_the_formula_with_adams_second_moment():
  params, _, grad_fn = helpers.problem()
  base = optax.adam(0.01, b2=0.9)
  tx = optax_sam.preconditioned_sam(base, rho=0.1, precondition_eps=1e-3)
  plain_sam = optax_sam.sam(base, rho=0.1)
  state, w = tx.init(params), params
  base_state, v = base.init(params), params
  for step in range(4):
    u, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
    g = grad_fn(v)
    nu = base_state[0].nu
    d = jax.tree.map(lambda g, n: g / (jnp.sqrt(n) + 1e-3), g, nu)
    scale = 0.1 / (optax.tree.norm(d) + 1e-12)
    e = jax.tree.map(lambda x, s=scale: s * x, d)
    want, base_state = base.update(grad_fn(jax.tree.map(jnp.add, v, e)), base_state, v)
    assert helpers.max_diff(u, want) < 1e-6, step
    if step == 0:  # nu = 0: the direction is g / eps, after normalization SAM's
      sam_u, _ = plain_sam.update(grad_fn(w), plain_sam.init(params), w, grad_fn=grad_fn)
      assert helpers.max_diff(u, sam_u) < 1e-6
    w, v = optax.apply_updates(w, u), optax.apply_updates(v, want)
  sam_u, _ = plain_sam.update(grad_fn(w), plain_sam.init(w), w, grad_fn=grad_fn)
  assert helpers.max_diff(u, sam_u) > 1e-6  # later steps: a different direction


def test_preconditioned_ascent_needs_adam_and_a_sam_optimizer():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.preconditioned_sam(optax.sgd(0.1, momentum=0.9))
  with pytest.raises(ValueError, match='second moment: use optax.adam'):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  alone = optax_sam.preconditioned_direction()
  with pytest.raises(ValueError, match='passes base_state'):
    alone.update(grad_fn(params), alone.init(params), params)
  with pytest.raises(ValueError, match='eps'):
    optax_sam.preconditioned_direction(0.0)


def test_preconditioned_functional_sam_composes():
  """The paper's combination: the preconditioned ascent with the functional gradient."""
  with jax.enable_x64(True):
    params, output_fn, output_loss = mlp_problem()
    tx = optax_sam.preconditioned_sam(optax.adamw(0.01), rho=0.1)
    state, w = tx.init(params), params
    for _ in range(3):
      loss, grads, grad_fn = optax_sam.functional_value_and_grad(output_fn, output_loss, w)
      u, state = tx.update(grads, state, w, grad_fn=grad_fn)
      w = optax.apply_updates(w, u)
    assert np.isfinite(float(loss))
    assert float(output_loss(output_fn(w))) < float(output_loss(output_fn(params)))


# ----------------------------------------------------------------------- the two paths


def test_sam_gradient_paths_add_up_and_vanish_where_they_should():
  with jax.enable_x64(True):
    params, output_fn, output_loss = mlp_problem()
    paths = optax_sam.sharpness.sam_gradient_paths(output_fn, output_loss, params, 0.3)
    grad = jax.grad(lambda p: output_loss(output_fn(p)))
    g = grad(params)
    e = jax.tree.map(lambda v: 0.3 * v / (optax.tree.norm(g) + 1e-12), g)
    perturbed = jax.tree.map(jnp.add, params, e)
    functional = optax.tree.sub(
      dense_functional_gradient(output_fn, output_loss, params, perturbed), g
    )
    logit = optax.tree.sub(optax.tree.sub(grad(perturbed), g), functional)
    assert float(paths.functional_norm) == pytest.approx(float(optax.tree.norm(functional)))
    assert float(paths.logit_norm) == pytest.approx(float(optax.tree.norm(logit)))
    assert float(paths.grad_norm) == pytest.approx(float(optax.tree.norm(g)))
    share = paths.logit_norm / (paths.logit_norm + paths.functional_norm)
    assert float(paths.logit_share) == pytest.approx(float(share))
    # A loss linear in the outputs has a constant output gradient: no logit path.
    linear = optax_sam.sharpness.sam_gradient_paths(
      output_fn, lambda z: jnp.sum(z * jnp.arange(3.0)), params, 0.3
    )
    assert float(linear.logit_norm) < 1e-12 < float(linear.functional_norm)
    assert float(linear.logit_share) == 0.0
