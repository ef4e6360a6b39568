"""LookSAM against the NumPy re-implementation of the reference code, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers, reference_cheap


def _run(tx, params, grad_fn, calls):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  trajectory = []
  for _ in range(calls):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    trajectory.append(params)
  return trajectory, state


@pytest.mark.parametrize('weight_decay', [0.0, 0.01])
@pytest.mark.parametrize('k', [1, 3])
def test_matches_reference_step_for_step(k, weight_decay):
  with jax.enable_x64(True):
    params, _, grad_fn = helpers.problem(jnp.float64)
    base = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(0.1, momentum=0.9))
    tx = optax_sam.look_sam(base, rho=0.1, alpha=0.7, k=k)
    trajectory, _ = _run(tx, params, grad_fn, 9)

    def grad(w):
      out = grad_fn({key: jnp.asarray(v) for key, v in w.items()})
      return {key: np.asarray(v) for key, v in out.items()}

    w = {key: np.asarray(v) for key, v in params.items()}
    ref = reference_cheap.ReferenceLookSAM(
      grad, w, lr=0.1, momentum=0.9, weight_decay=weight_decay, rho=0.1, alpha=0.7, k=k
    )
    for got in trajectory:
      w = ref.step(w)
      assert helpers.max_diff(got, w) < 1e-12
    assert helpers.max_diff(w, params) > 0.1


def test_k_one_is_sam_and_alpha_zero_is_every_k():
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  sam = _run(optax_sam.sam(base, rho=0.1), params, grad_fn, 6)[0][-1]
  look = _run(optax_sam.look_sam(base, rho=0.1, k=1), params, grad_fn, 6)[0][-1]
  assert helpers.max_diff(look, sam) < 1e-6
  every = _run(optax_sam.sam(base, rho=0.1, when=optax_sam.every(3)), params, grad_fn, 7)[0][-1]
  look = _run(optax_sam.look_sam(base, rho=0.1, alpha=0.0, k=3), params, grad_fn, 7)[0][-1]
  assert helpers.max_diff(look, every) < 1e-6
  assert helpers.max_diff(look, sam) > 1e-4


def test_state_holds_one_parameter_sized_buffer():
  params, _, _ = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  n = size(params)
  extra = size(optax_sam.look_sam(base).init(params)) - size(base.init(params))
  assert n <= extra < 2 * n  # the direction, plus the policy's count
  assert (
    size(optax_sam.sam(base, when=optax_sam.every(5)).init(params)) - size(base.init(params)) < n
  )


def test_the_stored_direction_is_the_unit_orthogonal_component():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.look_sam(optax.sgd(0.1), rho=0.1, k=5)
  g = grad_fn(params)
  _, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  v = state.memory
  assert abs(float(optax.tree.norm(v)) - 1.0) < 1e-6
  assert abs(float(optax.tree.vdot(v, g))) < 2e-6 * float(optax.tree.norm(g))  # float32 rounding
