r"""The ascent preconditioned by the base optimizer: SAM's perturbation in Adam's geometry.

Adam steps along :math:`g / (\sqrt{\hat\nu} + \epsilon)`; a SAM perturbation
along the raw gradient then probes directions the optimizer barely moves in and
is dominated by the few coordinates with large gradients. Preconditioning the
ascent with the same diagonal,

.. math::

  d = \frac{g}{\sqrt{\nu} + \epsilon}, \qquad e = \rho \frac{d}{\|d\|},

perturbs where the optimizer moves (Singh et al., 2025, who combine it with
Functional-SAM for language models). :func:`preconditioned_direction` is the
map :math:`g \mapsto d`, an Optax transformation that reads :math:`\nu` from
the base optimizer's state, which the SAM mechanism passes every perturbation
as the extra argument ``base_state``; chained before :func:`ascent` it is the
perturbation of :func:`preconditioned_sam`.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import numerics
from optax_sam._src import state as state_lib


def preconditioned_direction(eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  r"""Maps ``g`` to :math:`g / (\sqrt{\nu} + \epsilon)`, Adam's :math:`\nu` from the base state.

  :math:`\nu` is the base optimizer's second moment before this step (zeros at
  the first step, where the direction is :math:`g / \epsilon`: after the ascent's
  normalization, SAM's), without Adam's bias correction (after normalization the
  correction only rescales :math:`\epsilon`). Chain it before :func:`ascent`.

  Args:
    eps: added to :math:`\sqrt{\nu}` (``> 0``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the extra
    argument ``base_state`` (the SAM mechanism passes it).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(jnp.array([1.0, 100.0]) * w ** 2)
    >>> perturbation = optax.chain(optax_sam.preconditioned_direction(), optax_sam.ascent(0.1))
    >>> tx = optax_sam.sharpness_aware(optax.adam(0.01), perturbation)
    >>> w, state = jnp.ones(2), tx.init(jnp.ones(2))
    >>> for _ in range(3):
    ...   u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    ...   w = optax.apply_updates(w, u)

  References:
    Singh et al., 2025, "Avoiding spurious sharpness minimization broadens
    applicability of SAM": https://arxiv.org/abs/2502.02407
  """
  numerics.check_range('eps', eps, 0.0)
  if numerics.is_concrete(eps) and eps == 0:
    raise ValueError('eps must be > 0 (it divides where the second moment is 0), got 0.')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, base_state: Optional[Any] = None, **extra):
    del params, extra
    if base_state is None:
      raise ValueError(
        "preconditioned_direction reads the base optimizer's state: use it as (part of) the "
        'perturbation of a SAM optimizer (sharpness_aware or preconditioned_sam), which passes '
        'base_state.'
      )
    nu = state_lib.second_moment(base_state)
    d = jax.tree.map(
      lambda g, v: g / (jnp.sqrt(v.astype(g.dtype)) + jnp.asarray(eps, g.dtype)), updates, nu
    )
    return d, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
