"""Directional sharpness: the curvature of the loss along one given direction."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_sam._src import numerics
from optax_sam._src.diagnostics import chunking
from optax_sam._src.diagnostics import hvp as hvp_lib


class DirectionalSharpness(NamedTuple):
  """Output of :func:`directional_sharpness`.

  Attributes:
    sharpness: :math:`d^\\top H d / \\|d\\|^2`, the curvature along ``d`` (a
      Rayleigh quotient: between the smallest and the largest eigenvalue of
      :math:`H`; 0 for ``d = 0``).
    curvature: :math:`d^\\top H d`, the second-order change of the loss along
      ``d`` unnormalized: the loss changes by about
      :math:`g^\\top d + \\frac12 d^\\top H d` when the weights move by ``d``.
    slope: :math:`g^\\top d`, the first-order change along ``d``.
  """

  sharpness: jax.Array
  curvature: jax.Array
  slope: jax.Array


def directional_sharpness(
  loss_fn: hvp_lib.LossFn,
  params: Any,
  batch: Any,
  direction: Any,
  *,
  num_chunks: int = 1,
) -> DirectionalSharpness:
  r"""The loss's curvature along a direction, e.g. the optimizer's update.

  .. math::

    s(d) = \frac{d^\top H d}{\|d\|^2}, \qquad H = \nabla^2_w L(w, B),

  with one Hessian-vector product (and the gradient, for the slope
  :math:`g^\top d`). Along the update :math:`d = u` of an optimizer step,
  :math:`s(u)` compared with :math:`2 / \eta` tells whether the step is in
  the stable range of gradient descent along the direction it actually moves,
  which the top eigenvalue only bounds; SAM studies on language models track it
  for that reason. Products and norms are computed in float32 or wider.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point :math:`w`.
    batch: the data.
    direction: ``d``, a tree like ``params`` (e.g. the updates of a step).
    num_chunks: evaluate the product over this many chunks of ``batch`` (static).

  Returns:
    A :class:`DirectionalSharpness`.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> h = jnp.array([4.0, 1.0])
    >>> loss_fn = lambda p, batch: 0.5 * jnp.sum(h * p ** 2)
    >>> r = sharpness.directional_sharpness(loss_fn, jnp.ones(2), None, jnp.array([1.0, 1.0]))
    >>> print(float(r.sharpness), float(r.curvature), float(r.slope))  # (4 + 1) / 2
    2.5 5.0 5.0

  References:
    Singh et al., 2025, "Avoiding spurious sharpness minimization broadens
    applicability of SAM": https://arxiv.org/abs/2502.02407
  """
  chunking.check_num_chunks(num_chunks)
  if jax.tree.structure(direction) != jax.tree.structure(params):
    raise ValueError(
      'direction must have the structure of params, got '
      f'{jax.tree.structure(direction)} for {jax.tree.structure(params)}.'
    )
  _, g = hvp_lib.loss_and_grad(loss_fn, params, batch, num_chunks)
  direction = jax.tree.map(lambda d, p: jnp.asarray(d, jnp.result_type(p)), direction, params)
  hd = hvp_lib.hvp_fn(loss_fn, params, batch, num_chunks)(direction)
  curvature = numerics.vdot(direction, hd)
  squared = numerics.vdot(direction, direction).astype(curvature.dtype)
  return DirectionalSharpness(
    sharpness=numerics.safe_ratio(curvature, squared),
    curvature=curvature,
    slope=numerics.vdot(g, direction).astype(curvature.dtype),
  )
