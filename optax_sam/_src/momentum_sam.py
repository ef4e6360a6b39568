"""Momentum-SAM: SAM's ascent taken along the base optimizer's momentum, one gradient per step.

The model holds the weights ``w - rho v / (||v|| + eps)``, where ``w`` are the
clean weights and ``v`` is the base optimizer's momentum (SGD's trace, Adam's
first moment, not bias-corrected). The caller's gradient at the held weights is
the only gradient of the step: no ``grad_fn``, and no state beyond the base
optimizer's and one scalar.
"""

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import micro_batches as micro_batches_lib
from optax_sam._src import numerics
from optax_sam._src import state as state_lib

# The state and the momentum lookup live with the other states (clean_params reads them).
MomentumSAMState = state_lib.MomentumSAMState
momentum = state_lib.momentum


def momentum_sam(
  base_optimizer: optax.GradientTransformation,
  rho: jax.typing.ArrayLike = 0.3,
  *,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM: perturb against the momentum, with the gradient the caller already has.

  With ``w_t`` the clean weights and ``v_t`` the base optimizer's momentum, the
  model holds :math:`\tilde w_t = w_t - s_t v_t`, :math:`s_t = \rho / (\|v_t\| + \epsilon)`
  (:math:`s_0 = 0`). ``update(g, state, params)`` takes ``params`` = the held
  weights and ``g`` = the gradient there, and

  .. math::

    w_t = \tilde w_t + s_t v_t, \quad
    (u_t, v_{t+1}) = \mathrm{base}(g, w_t), \quad
    w_{t+1} = w_t + u_t, \quad
    \tilde w_{t+1} = w_{t+1} - s_{t+1} v_{t+1},

  returning the update :math:`\tilde w_{t+1} - \tilde w_t`. The base optimizer
  always sees the clean weights (decoupled weight decay acts on ``w``), and
  :func:`clean_params` gives ``w`` for evaluation and checkpoints. For
  BatchNorm models, re-estimate the running statistics at the clean weights
  before evaluating (see the docs), as the official code does.

  Args:
    base_optimizer: an optax optimizer with momentum: ``optax.sgd(lr,
      momentum=...)``, ``optax.adam``, ``optax.adamw``, or a chain holding
      exactly one ``optax.trace`` or ``optax.scale_by_adam``.
    rho: perturbation radius (``>= 0``); the paper's is an order of magnitude
      above SAM's (0.3 for SGD on CIFAR).
    eps: added to the momentum's norm (``>= 0``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is
    :class:`MomentumSAMState` (the base optimizer's state and one scalar).

  Raises:
    ValueError: for ``rho`` or ``eps`` below 0, or a base optimizer without
      momentum (checked on a one-leaf example at construction, and at ``init``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = optax_sam.momentum_sam(optax.sgd(0.1, momentum=0.9), rho=0.3)
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> u, state = tx.update(jax.grad(loss)(w), state, w)  # v = g = [-2, -2]
    >>> w = optax.apply_updates(w, u)  # clean 0.2, held 0.2 + 0.3 / sqrt(2)
    >>> optax_sam.clean_params(w, state)
    Array([0.2, 0.2], dtype=float32)

  References:
    Becker et al., 2024, "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead": https://arxiv.org/abs/2401.12033
  """
  numerics.check_range('rho', rho)
  numerics.check_range('eps', eps)
  base_optimizer = optax.with_extra_args_support(base_optimizer)
  try:
    example = jax.eval_shape(base_optimizer.init, jax.ShapeDtypeStruct((1,), jnp.float32))
  except Exception:  # noqa: BLE001 - a base that needs the real params is checked at init
    example = None
  if example is not None and not state_lib.find_states(example, state_lib.MOMENTUM_STATES):
    raise ValueError(
      'base_optimizer must have momentum for momentum_sam (optax.sgd with momentum > 0, '
      'optax.adam, optax.adamw); its state holds no optax.TraceState or ScaleByAdamState.'
    )

  def init_fn(params):
    base_state = base_optimizer.init(params)
    momentum(base_state)  # raises if there is none
    return MomentumSAMState(jnp.zeros([], numerics.accumulation_dtype(params)), base_state)

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError('momentum_sam needs the held params: call update(grads, state, params).')
    if isinstance(extra.get('grad_fn'), micro_batches_lib.MicroBatches):
      raise ValueError(
        'momentum_sam takes no second gradient, so it cannot run micro_batches: pass it the '
        'gradient of the whole batch.'
      )
    dtype = state.scale.dtype
    v_prev = momentum(state.base_state)
    clean = state_lib.add_scaled(params, state.scale, v_prev)
    base_updates, base_state = base_optimizer.update(updates, state.base_state, clean, **extra)
    v = momentum(base_state)
    norm = numerics.global_norm(v).astype(dtype)
    scale = numerics.safe_ratio(jnp.asarray(rho, dtype), norm + jnp.asarray(eps, dtype))

    def step(u, a, b, p):
      total = u.astype(dtype) + state.scale * a.astype(dtype) - scale * b.astype(dtype)
      return total.astype(jnp.result_type(p))

    new_updates = jax.tree.map(step, base_updates, v_prev, v, params)
    return new_updates, MomentumSAMState(scale, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
