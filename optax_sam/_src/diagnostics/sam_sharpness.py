"""SAM sharpness: the loss increase along the ascent step of an optax_sam perturbation."""

from typing import Any, NamedTuple

import jax
import optax

from optax_sam._src import perturbations
from optax_sam._src.diagnostics import chunking
from optax_sam._src.diagnostics import hvp as hvp_lib


class SAMSharpness(NamedTuple):
  """Output of :func:`sam_sharpness`.

  Attributes:
    sharpness: ``perturbed_loss - clean_loss``.
    clean_loss: :math:`L(w)`.
    perturbed_loss: :math:`L(w + e)`.
  """

  sharpness: jax.Array
  clean_loss: jax.Array
  perturbed_loss: jax.Array


def sam_sharpness(
  loss_fn: hvp_lib.LossFn,
  params: Any,
  batch: Any,
  *,
  rho: float = 0.05,
  perturbation: optax.GradientTransformation | None = None,
  perturbation_state: Any = None,
  num_chunks: int = 1,
) -> SAMSharpness:
  r"""The sharpness SAM minimizes: the loss increase along its ascent step.

  .. math::

    S(w) = L(w + e) - L(w), \qquad e = P(\nabla L(w), w),

  with :math:`P` any optax_sam perturbation, by default
  :func:`optax_sam.ascent` with radius ``rho``, :math:`e = \rho g / \|g\|`
  (Foret et al.'s first-order solution of
  :math:`\max_{\|e\| \le \rho} L(w + e)`). For a quadratic
  :math:`L = \frac12 (w - w^*)^\top H (w - w^*)` it is
  :math:`\rho \|g\| + \frac{\rho^2}{2} \hat g^\top H \hat g`: a first-order
  term that vanishes at a minimum plus the curvature along the gradient.

  Cost: one gradient and one more loss evaluation.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point :math:`w`.
    batch: the data (gradient and both losses use all of it).
    rho: radius of the default perturbation; ignored when ``perturbation`` is
      given.
    perturbation: an optax_sam perturbation (``ascent(...)``, or
      ``optax.chain(friendly_direction(...), ascent(...))``), any Optax
      transformation mapping the gradient to :math:`e`.
    perturbation_state: its state (default ``perturbation.init(params)``,
      e.g. pass F-SAM's EMA from training).
    num_chunks: evaluate over this many chunks of ``batch`` (static).

  Returns:
    A :class:`SAMSharpness`.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(w ** 2)  # H = I, g = w
    >>> r = sharpness.sam_sharpness(loss_fn, jnp.array([3.0, 4.0]), None, rho=0.1)
    >>> print(f'{float(r.sharpness):.4f}')  # rho |g| + rho^2 / 2 = 0.5 + 0.005
    0.5050

  References:
    Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently
    Improving Generalization": https://arxiv.org/abs/2010.01412
  """
  chunking.check_num_chunks(num_chunks)
  if perturbation is None:
    perturbation = perturbations.ascent(rho)
  if perturbation_state is None:
    perturbation_state = perturbation.init(params)
  clean_loss, grads = hvp_lib.loss_and_grad(loss_fn, params, batch, num_chunks)
  e, _ = perturbation.update(grads, perturbation_state, params)
  perturbed = jax.tree.map(lambda w, d: w + d.astype(w.dtype), params, e)
  perturbed_loss = hvp_lib.loss(loss_fn, perturbed, batch, num_chunks)
  return SAMSharpness(
    sharpness=perturbed_loss - clean_loss, clean_loss=clean_loss, perturbed_loss=perturbed_loss
  )
