r"""Functional-SAM's gradient: the Jacobian at the perturbed weights, the output gradient clean.

With :math:`L(w) = \ell(f(w))` (:math:`f` the network's outputs, e.g. logits,
:math:`\ell` the loss of the outputs), SAM's perturbed gradient splits by the
chain rule into two paths:

.. math::

  \nabla L(w + e) = J(w + e)^\top \nabla\ell(f(w + e))
  = \underbrace{J(w + e)^\top \nabla\ell(f(w))}_{\text{functional path}}
  + \underbrace{J(w + e)^\top \big(\nabla\ell(f(w + e))
    - \nabla\ell(f(w))\big)}_{\text{logit path}}.

Singh et al. (2025) find that in language models SAM's regularization goes
mostly through the logit path (it changes the logits' statistics, not the
function's geometry) and that keeping only the functional path, Functional-SAM,

.. math::

  g_{fsam} = J(w + e)^\top \nabla\ell(f(w)),

trains better than AdamW and SAM. It is a ``grad_fn``: one ``jax.vjp`` at
:math:`w + e` pulled back along the output gradient of the clean pass, so it
composes with every perturbation and correction (and, with
:func:`preconditioned_sam`, gives their preconditioned Functional-SAM).
"""

from collections.abc import Callable
from typing import Any

import jax

OutputFn = Callable[[Any], Any]


def functional_value_and_grad(
  output_fn: OutputFn,
  output_loss: Callable[[Any], Any],
  params: Any,
  *,
  has_aux: bool = False,
) -> tuple[Any, Any, Callable[[Any], Any]]:
  r"""The clean pass of a Functional-SAM step and its ``grad_fn``, in one call.

  The clean pass is one forward and one backward at ``params`` (a
  ``jax.vjp`` of ``output_fn`` and the gradient of ``output_loss`` at its
  outputs); ``grad_fn(w)`` is one more forward and backward, at ``w``, pulled
  back along the clean output gradient :math:`\nabla\ell(f(w_{clean}))`:

  .. math::

    \texttt{grads} = J(w)^\top \nabla\ell(f(w)), \qquad
    \texttt{grad\_fn}(w') = J(w')^\top \nabla\ell(f(w)).

  Args:
    output_fn: ``output_fn(params) -> outputs`` (any pytree of arrays; the batch
      closed over).
    output_loss: ``output_loss(outputs) -> loss`` (a scalar; or ``(loss, aux)``
      with ``has_aux``; the targets closed over).
    params: the clean weights :math:`w`.
    has_aux: whether ``output_loss`` returns ``(loss, aux)``.

  Returns:
    ``(value, grads, grad_fn)``: the loss (or ``(loss, aux)``), the clean
    gradient and ``grad_fn`` for ``update(grads, state, params, grad_fn=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> x, y = jnp.array([[1.0, 2.0], [3.0, -1.0]]), jnp.array([0, 1])
    >>> output_fn = lambda w: jnp.tanh(x @ w)
    >>> output_loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(
    ...   logits, y).mean()
    >>> tx = optax_sam.sam(optax.adam(0.01), rho=0.05)
    >>> w = jnp.eye(2)
    >>> state = tx.init(w)
    >>> loss, grads, grad_fn = optax_sam.functional_value_and_grad(output_fn, output_loss, w)
    >>> u, state = tx.update(grads, state, w, grad_fn=grad_fn)

  References:
    Singh et al., 2025, "Avoiding spurious sharpness minimization broadens
    applicability of SAM": https://arxiv.org/abs/2502.02407
  """
  outputs, pullback = jax.vjp(output_fn, params)
  value, output_grads = jax.value_and_grad(output_loss, has_aux=has_aux)(outputs)
  (grads,) = pullback(output_grads)

  def grad_fn(perturbed: Any) -> Any:
    _, pullback_there = jax.vjp(output_fn, perturbed)
    return pullback_there(output_grads)[0]

  return value, grads, grad_fn
