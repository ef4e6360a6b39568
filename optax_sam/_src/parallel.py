r"""SAM with its two gradients in parallel: the ascent follows the last step's auxiliary gradient.

SAM's two gradients depend on each other: the perturbed point needs the clean
gradient. SAMPa (Xie et al., 2024) breaks the dependence: the ascent of step
:math:`t` follows :math:`d_t = \nabla L(y_t)`, the gradient at an auxiliary point
computed in the step before, and the gradient at the next auxiliary point is taken
in the same step, beside the perturbed one:

.. math::

  \tilde x_t = x_t + e(d_t), \qquad
  y_{t+1} = x_t + \mathrm{base}(d_t, x_t) \ \text{(not committed)}, \\
  x_{t+1} = x_t + \mathrm{base}\big((1 - \lambda) \nabla L(\tilde x_t)
    + \lambda \nabla L(y_{t+1}),\ x_t\big), \qquad d_{t+1} = \nabla L(y_{t+1}),

with :math:`e` any perturbation (SAMPa's: :math:`\rho d / (\|d\| + 10^{-12})`),
:math:`d_0 = 0` and :math:`y_1 = x_0` (the official loop adds its base
optimizer's momentum and decay terms to the auxiliary step only once a momentum
buffer exists, so the first step is a plain base step). The two gradients are
taken by :func:`pairs.evaluate`: one ``vmap`` over the stacked points, one after
the other, or one per device.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import numerics, one_call, pairs
from optax_sam._src import options as options_lib


class ParallelSAMState(NamedTuple):
  """The state of :func:`parallel_sam`.

  Attributes:
    count: the steps taken (int32).
    direction: :math:`d`, the gradient at the last auxiliary point (zeros before the first step).
    perturbation: the perturbation's state.
    base: the base optimizer's state.
  """

  count: jax.Array
  direction: optax.Updates
  perturbation: optax.OptState
  base: optax.OptState


def parallel_sam(
  base_optimizer: optax.GradientTransformation,
  perturbation: optax.GradientTransformation,
  lmbda: Any,
  *,
  axis_name: Optional[str] = None,
  pair_axis_name: Optional[str] = None,
  pair_route: str = 'vmap',
  pair_sharding: Optional[jax.sharding.Sharding] = None,
) -> optax.GradientTransformationExtraArgs:
  """The parallel step (see the module): the mechanism of :func:`optax_sam.sampa`.

  Args:
    base_optimizer: the optimizer of :math:`x` (also gives the auxiliary step).
    perturbation: maps :math:`d` (and the point) to the ascent :math:`e`.
    lmbda: the weight of the auxiliary gradient, in ``[0, 1]``.
    axis_name: average both gradients over this data-parallel axis.
    pair_axis_name: an axis of size 2 that splits the two gradients over two devices.
    pair_route: ``'vmap'`` or ``'sequential'`` (see :mod:`pairs`).
    pair_sharding: with ``'vmap'``, a sharding of the stacked pair.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, grad_fn=...)`` (``grads`` is not used: may be ``None``).
  """
  numerics.check_range('lmbda', lmbda, 0.0, 1.0)
  if pair_route not in pairs.ROUTES:
    raise ValueError(f'pair_route must be one of {pairs.ROUTES}, got {pair_route!r}.')
  options_lib.check_transformation('base_optimizer', base_optimizer)
  base = optax.with_extra_args_support(base_optimizer)
  perturbation = optax.with_extra_args_support(perturbation)

  def init_fn(params):
    return ParallelSAMState(
      jnp.zeros([], jnp.int32),
      optax.tree.zeros_like(params),
      perturbation.init(params),
      base.init(params),
    )

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra):
    del updates  # the step's gradients are both taken here
    one_call.check_call(params, grad_fn)
    e, perturbation_state = perturbation.update(
      state.direction, state.perturbation, params, base_state=state.base
    )
    tentative, _ = base.update(state.direction, state.base, params, **extra)
    tentative = optax.tree.where(state.count > 0, tentative, optax.tree.zeros_like(tentative))
    g_perturbed, g_auxiliary = pairs.evaluate(
      grad_fn,
      optax.apply_updates(params, e),
      optax.apply_updates(params, tentative),
      route=pair_route,
      axis_name=pair_axis_name,
      sharding=pair_sharding,
    )
    one_call.check_grad_fn_output(g_perturbed, params)
    g_perturbed, g_auxiliary = one_call.average((g_perturbed, g_auxiliary), axis_name)
    mixed = jax.tree.map(
      lambda a, b: ((1 - lmbda) * a + lmbda * b).astype(a.dtype), g_perturbed, g_auxiliary
    )
    u, base_state = base.update(mixed, state.base, params, **extra)
    direction = jax.tree.map(lambda g, d: g.astype(d.dtype), g_auxiliary, state.direction)
    count = optax.safe_increment(state.count)
    return u, ParallelSAMState(count, direction, perturbation_state, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
