"""Cycles: one ``update`` runs ``k`` inner SAM steps from the weights, then combines them.

The step shape of Lookbehind-SAM (Mordido et al. 2024), and of any method that takes several
ascent and descent steps per outer step and keeps only a combination of their result. From the
*slow* weights ``s`` (the weights the model holds):

1. ``a_0 = phi_0 = s``; ``g_1`` the clean gradient at ``s``;
2. for ``j = 1 .. k``: ``a_j = a_{j-1} + perturbation(g_j, a_{j-1})`` (the ascents accumulate),
   ``g_{j+1} = grad_fn(a_j)``, ``phi_j = phi_{j-1} + base(g_{j+1}, phi_{j-1})`` (one base state
   throughout);
3. ``s' = combine(s, phi_1, phi_k)``.

``grad_fn`` is called ``k`` times. A new method of this shape is a new ``combine`` (or another
perturbation), not a new loop.
"""

from collections.abc import Callable
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import cpu_convolutions, numerics, one_call, options
from optax_sam._src import micro_batches as micro_batches_lib

Combine = Callable[[optax.Params, optax.Params, optax.Params], optax.Params]


class CycleState(NamedTuple):
  """State of :func:`cycle`.

  Attributes:
    perturbation_state: state of the perturbation (advanced ``k`` times per update).
    base_state: state of the base optimizer (advanced ``k`` times per update: its schedules
      count inner steps).
  """

  perturbation_state: optax.OptState
  base_state: optax.OptState


def interpolate(alpha: Optional[float] = 0.5) -> Combine:
  r"""Lookbehind's combination: :math:`s' = \alpha \phi_k + (1 - \alpha) s`.

  Args:
    alpha: the weight of the fast weights, in ``[0, 1]``; ``None`` chooses it per
      leaf, :math:`\alpha_l = (\cos(\phi_1 - s, \phi_k - s) + 1) / 2` (the official
      ``alpha = -1``; the cosine's denominator is at least 1e-8, as in PyTorch).

  Returns:
    ``combine(s, phi_1, phi_k) -> s'``.
  """
  if alpha is not None:
    numerics.check_range('alpha', alpha, 0.0, 1.0)

  def leaf_alpha(s, first, last):
    dtype = jnp.promote_types(jnp.float32, s.dtype)
    if alpha is not None:
      return jnp.asarray(alpha, dtype)
    a, b = (first - s).ravel().astype(dtype), (last - s).ravel().astype(dtype)
    cosine = jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-8)
    return (cosine + 1) / 2

  def combine(slow, first, last):
    def leaf(s, f, z):
      w = leaf_alpha(s, f, z)
      return (w * z.astype(w.dtype) + (1 - w) * s.astype(w.dtype)).astype(s.dtype)

    return jax.tree.map(leaf, slow, first, last)

  return combine


def cycle(
  base_optimizer: optax.GradientTransformation,
  perturbation: optax.GradientTransformation,
  combine: Combine,
  k: int,
  *,
  axis_name: Optional[str] = None,
  local_perturbation: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """``k`` inner SAM steps from the slow weights per ``update``, then ``combine`` (see the module).

  Args:
    base_optimizer: the optimizer of the fast weights.
    perturbation: maps a gradient (and the point it was taken at) to the ascent ``e``.
    combine: ``combine(s, phi_1, phi_k) -> s'``, e.g. :func:`interpolate`.
    k: inner steps per update (an integer ``>= 1``).
    axis_name: average the gradients over this mapped axis (``pmap``/``shard_map``).
    local_perturbation: with ``axis_name``, each device ascends along its own gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call ``update(g, state, params, grad_fn=...)``
    with ``g`` the clean gradient at ``params``.
  """
  k = numerics.check_integer('k', k)
  numerics.check_flag('local_perturbation', local_perturbation)
  if local_perturbation and axis_name is None:
    raise ValueError('local_perturbation=True needs axis_name.')
  options.check_transformation('base_optimizer', base_optimizer)
  base = optax.with_extra_args_support(base_optimizer)
  perturbation = optax.with_extra_args_support(perturbation)
  axes = one_call.Axes(axis_name, local_perturbation)

  def init_fn(params):
    return CycleState(perturbation.init(params), base.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra):
    one_call.check_call(params, grad_fn)
    if isinstance(grad_fn, micro_batches_lib.MicroBatches):
      raise ValueError(
        'a cycle of inner steps (lookbehind_sam) takes no micro_batches: pass a grad_fn of the '
        'whole batch.'
      )

    def inner(carry, _):
      a, g, fast, first, j, perturbation_state, base_state = carry
      e, perturbation_state = perturbation.update(
        axes.before(g), perturbation_state, a, mean_grads=axes.mean(g), base_state=base_state
      )
      a = optax.apply_updates(a, e)
      g = grad_fn(a)
      one_call.check_grad_fn_output(g, updates)
      u, base_state = base.update(axes.mean(g), base_state, fast, **extra)
      fast = optax.apply_updates(fast, u)
      first = optax.tree.where(j == 0, fast, first)
      return (a, g, fast, first, j + 1, perturbation_state, base_state), None

    carry = (params, updates, params, params, jnp.zeros([], jnp.int32), *state)
    carry, _ = cpu_convolutions.scan(inner, carry, None, length=k)
    _, _, fast, first, _, perturbation_state, base_state = carry
    new = combine(params, first, fast)
    return optax.tree.sub(new, params), CycleState(perturbation_state, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
