r"""Where SAM's gradient change goes: through the logits, or through the function.

With :math:`L(w) = \ell(f(w))`, SAM replaces the gradient :math:`g = J(w)^\top
\nabla\ell(f(w))` by :math:`\nabla L(w + e) = J(w + e)^\top \nabla\ell(f(w + e))`.
The change splits exactly into two paths (Singh et al., 2025):

.. math::

  \nabla L(w + e) - g
  = \underbrace{J(w + e)^\top \big(\nabla\ell(f(w + e)) - \nabla\ell(f(w))\big)}_{\text{logit path}}
  + \underbrace{\big(J(w + e) - J(w)\big)^\top \nabla\ell(f(w))}_{\text{functional path}}.

The logit path penalizes the curvature of the loss in output space (it reshapes
the logits' statistics, e.g. their scale); the functional path the curvature of
the network function. Functional-SAM keeps only the second.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import numerics


class SAMGradientPaths(NamedTuple):
  """The two paths of SAM's gradient change at one point.

  Attributes:
    grad_norm: :math:`\\|g\\|`, the clean gradient's norm.
    logit_norm: the norm of the logit path.
    functional_norm: the norm of the functional path.
    logit_share: ``logit_norm / (logit_norm + functional_norm)`` (0 when both are 0).
    change_norm: :math:`\\|\\nabla L(w + e) - g\\|`, the norm of their sum.
  """

  grad_norm: jax.Array
  logit_norm: jax.Array
  functional_norm: jax.Array
  logit_share: jax.Array
  change_norm: jax.Array


def sam_gradient_paths(
  output_fn: Callable[[Any], Any],
  output_loss: Callable[[Any], jax.Array],
  params: Any,
  rho: float,
  *,
  eps: float = 1e-12,
) -> SAMGradientPaths:
  r"""How SAM's perturbed gradient differs from the clean one, path by path (see the module).

  The perturbation is SAM's, :math:`e = \rho g / (\|g\| + \epsilon)`. Cost: two
  forward and two backward passes (the clean one, and one at :math:`w + e`
  pulled back along two output gradients at once).

  Args:
    output_fn: ``output_fn(params) -> outputs`` (e.g. the logits; the batch closed over).
    output_loss: ``output_loss(outputs) -> scalar`` (the targets closed over).
    params: the point :math:`w`.
    rho: the SAM radius (``>= 0``).
    eps: added to the norm (``>= 0``).

  Returns:
    A :class:`SAMGradientPaths`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> x, y = jnp.array([[1.0, 2.0], [0.5, -1.0]]), jnp.array([0, 1])
    >>> paths = optax_sam.sharpness.sam_gradient_paths(
    ...   lambda w: x @ w,
    ...   lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
    ...   jnp.eye(2), rho=0.1)
    >>> float(paths.functional_norm)  # a linear model's Jacobian does not move: all logit path
    0.0

  References:
    Singh et al., 2025, "Avoiding spurious sharpness minimization broadens
    applicability of SAM": https://arxiv.org/abs/2502.02407
  """
  numerics.check_range('rho', rho)
  numerics.check_range('eps', eps)
  outputs, pullback = jax.vjp(output_fn, params)
  output_grads = jax.grad(output_loss)(outputs)
  (g,) = pullback(output_grads)
  grad_norm = numerics.global_norm(g)
  scale = numerics.safe_ratio(jnp.asarray(rho, grad_norm.dtype), grad_norm + eps)
  perturbed = jax.tree.map(lambda w, v: w + (scale * v).astype(w.dtype), params, g)
  outputs_there, pullback_there = jax.vjp(output_fn, perturbed)
  output_grads_there = jax.grad(output_loss)(outputs_there)
  # One pullback of both cotangents: the output-gradient change and the clean output gradient.
  cotangents = (optax.tree.sub(output_grads_there, output_grads), output_grads)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), *cotangents)
  both = jax.vmap(lambda c: pullback_there(c)[0])(stacked)
  logit, along_clean = (jax.tree.map(lambda x, i=i: x[i], both) for i in (0, 1))
  functional = optax.tree.sub(along_clean, g)
  logit_norm, functional_norm = numerics.global_norm(logit), numerics.global_norm(functional)
  return SAMGradientPaths(
    grad_norm=grad_norm,
    logit_norm=logit_norm,
    functional_norm=functional_norm,
    logit_share=numerics.safe_ratio(logit_norm, logit_norm + functional_norm),
    change_norm=numerics.global_norm(optax.tree.add(logit, functional)),
  )
