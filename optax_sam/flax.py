"""Flax integration: SAM steps for ``nnx.Module`` models and Linen ``TrainState``.

Importing this module imports Flax; ``import optax_sam`` alone does not.

* NNX: :func:`nnx_value_and_grad` (or :func:`nnx_grad_fn`) builds the
  ``grad_fn`` of a one-call SAM step, so a step is
  ``optimizer.update(model, grads, grad_fn=grad_fn)`` with
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)``; :func:`nnx_clean_params` gives
  the unperturbed weights of a two-phase optimizer;
  :func:`nnx_functional_value_and_grad` gives Functional-SAM's clean pass and
  ``grad_fn`` (the output gradient kept at the clean weights);
  :func:`nnx_normalization_mask` is SAM-ON's ``perturb_mask``.
* Sharpness: :func:`nnx_loss_fn` builds the ``loss_fn(params, batch)`` that
  :mod:`optax_sam.sharpness` measures, in train or eval mode.
* Linen: :func:`apply_gradients` is ``TrainState.apply_gradients`` with
  ``grad_fn`` forwarded to the optimizer.
"""

from optax_sam._src.flax_helpers import (
  apply_gradients,
  nnx_clean_params,
  nnx_functional_value_and_grad,
  nnx_grad_fn,
  nnx_loss_fn,
  nnx_normalization_mask,
  nnx_value_and_grad,
)

__all__ = (
  'apply_gradients',
  'nnx_clean_params',
  'nnx_functional_value_and_grad',
  'nnx_grad_fn',
  'nnx_loss_fn',
  'nnx_normalization_mask',
  'nnx_value_and_grad',
)
