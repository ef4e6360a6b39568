"""optax_sam.flax.nnx_loss_fn: a pure loss of an nnx.Module in eval or train mode, for sharpness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import optax_sam.flax
from optax_sam import sharpness


class Net(nnx.Module):
  """Linear -> BatchNorm -> tanh -> Dropout -> Linear (66 parameters)."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(3, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jnp.tanh(self.norm(self.hidden(x)))))


def mse(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


@pytest.fixture
def setup():
  model = Net(nnx.Rngs(params=0, dropout=1))
  kx, ky = jax.random.split(jax.random.key(2))
  batch = (jax.random.normal(kx, (16, 3)), jax.random.normal(ky, (16, 2)))
  # Non-trivial running statistics, so that eval and train mode differ in BatchNorm too.
  model.norm.mean.value = jnp.linspace(-0.5, 0.5, 8)
  model.norm.var.value = jnp.linspace(0.5, 2.0, 8)
  return model, batch


def state_of(model):
  return [
    np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
    for x in jax.tree.leaves(nnx.as_pure(nnx.state(model)))
  ]


@pytest.mark.parametrize('train', [False, True])
def test_top_eigenvalue_matches_the_dense_hessian_of_the_same_function(setup, train):
  model, batch = setup
  before = state_of(model)
  loss_fn, params = optax_sam.flax.nnx_loss_fn(mse, model, train=train)
  flat, unravel = ravel_pytree(params)
  n = flat.size
  assert n == 66
  dense = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat)
  exact = np.linalg.eigvalsh(np.asarray(dense, np.float64))[::-1]
  r = jax.jit(
    lambda p, b: sharpness.hessian_eigenvalues(
      loss_fn, p, b, key=jax.random.key(0), k=2, num_steps=n + 4
    )
  )(params, batch)
  np.testing.assert_allclose(r.eigenvalues, exact[:2], rtol=2e-4)
  assert np.all(r.residuals < 1e-3 * exact[0])
  # The model is untouched: parameters, BatchNorm statistics and RNG counts.
  for a, b in zip(before, state_of(model), strict=True):
    np.testing.assert_array_equal(a, b)


def test_what_each_mode_measures(setup):
  model, batch = setup
  eval_fn, params = optax_sam.flax.nnx_loss_fn(mse, model, train=False)
  train_fn, _ = optax_sam.flax.nnx_loss_fn(mse, model, train=True)
  halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
  # Eval mode: a mean of per-example losses, so chunks average to the whole batch.
  np.testing.assert_allclose(
    eval_fn(params, batch), np.mean([eval_fn(params, h) for h in halves]), rtol=1e-6
  )
  # ... and it is the deployed model: running statistics, no dropout.
  deployed = nnx.view(model, deterministic=True, use_running_average=True)
  np.testing.assert_allclose(eval_fn(params, batch), mse(deployed, batch), rtol=1e-6)
  # Train mode: batch statistics and dropout make the loss depend on the batch's composition,
  # yet each evaluation is deterministic (the same dropout masks every time).
  whole = float(train_fn(params, batch))
  assert abs(whole - np.mean([float(train_fn(params, h)) for h in halves])) > 1e-3
  assert float(train_fn(params, batch)) == whole
  assert abs(whole - float(eval_fn(params, batch))) > 1e-3
  # has_aux drops the auxiliary output.
  aux_fn, _ = optax_sam.flax.nnx_loss_fn(
    lambda m, b: (mse(m, b), m(b[0])), model, train=False, has_aux=True
  )
  np.testing.assert_allclose(aux_fn(params, batch), eval_fn(params, batch), rtol=1e-7)


def test_a_model_without_dropout_or_batchnorm():
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  loss_fn, params = optax_sam.flax.nnx_loss_fn(lambda m, x: jnp.mean(m(x) ** 2), model, train=True)
  x = jnp.eye(3)
  # loss = mean((x W + b)^2): Hessian of (W, b) is 2/3 [[I, 1], [1^T, 3]], trace 2/3 * 6 = 4.
  t = sharpness.hessian_trace(loss_fn, params, x, key=jax.random.key(0), num_probes=300)
  assert abs(float(t.estimate) - 4.0) < 4 * float(t.stderr)
