r"""Curvature operators: matrix-free products with the Hessian, the GGN and the Fisher.

Each operator is a function ``matvec(v) -> M v`` on vectors with the
structure of ``params``, and every estimator of :mod:`optax_sam.sharpness`
(:func:`~optax_sam.sharpness.eigenvalues`, :func:`~optax_sam.sharpness.trace`,
:func:`~optax_sam.sharpness.spectral_density`, :func:`~optax_sam.sharpness.diagonal`)
takes any of them, or a user's own product. The generalized Gauss-Newton and the
Fisher matrices share one shape,

.. math::

  M = J^\top \Lambda J, \qquad J = \frac{\partial f(w, X)}{\partial w},

with :math:`f` = ``model_fn`` and :math:`\Lambda` a positive semi-definite
matrix on the space of the outputs, block diagonal over the examples; a
product is one linearization of ``model_fn`` (a forward pass), one
Jacobian-vector product, :math:`\Lambda` and one transposed product
(``jax.linearize`` and ``jax.linear_transpose``), and no Jacobian is formed.

References:
  Schraudolph, 2002, "Fast Curvature Matrix-Vector Products for Second-Order
  Gradient Descent", Neural Computation 14; Martens, 2020, "New Insights and
  Perspectives on the Natural Gradient Method": https://arxiv.org/abs/1412.1193;
  Kunstner, Balles and Hennig, 2019, "Limitations of the Empirical Fisher
  Approximation for Natural Gradient Descent": https://arxiv.org/abs/1905.12558
"""

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_sam._src import numerics
from optax_sam._src.diagnostics import chunking
from optax_sam._src.diagnostics import hvp as hvp_lib

ModelFn = Callable[[Any, Any], Any]
LossOfOutputs = Callable[[Any, Any], jax.Array]
Matvec = Callable[[Any], Any]
# Lambda: (outputs, targets, extra, u) -> Lambda u, for a chunk of examples.
_OutputOperator = Callable[[Any, Any, Any, Any], Any]


def hessian_operator(
  loss_fn: hvp_lib.LossFn, params: Any, batch: Any, num_chunks: int = 1
) -> Matvec:
  r"""The loss Hessian :math:`H = \nabla^2_w L(w, B)` as a product :math:`v \mapsto H v`.

  The same product as :func:`optax_sam.sharpness.hvp_fn` (forward over
  reverse mode, about one gradient and one forward-mode pass), under the name
  of the operator family.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (a mean over examples when
      ``num_chunks > 1``).
    params: the point :math:`w`.
    batch: the data.
    num_chunks: evaluate each product over this many chunks of ``batch``
      (static).

  Returns:
    ``matvec(v) -> Hv`` for ``v`` like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> loss_fn = lambda p, batch: jnp.sum(batch * p ** 2)
    >>> hv = sharpness.hessian_operator(loss_fn, jnp.ones(2), jnp.array([1.0, 3.0]))
    >>> print(hv(jnp.array([1.0, 1.0])))
    [2. 6.]
  """
  return hvp_lib.hvp_fn(loss_fn, params, batch, num_chunks)


def _output_space_operator(
  model_fn: ModelFn, output_operator: _OutputOperator, params: Any, batch: Any, num_chunks: int
) -> Matvec:
  """``v -> J^T Lambda J v``, chunk by chunk; ``batch = (inputs, targets, extra)``."""

  def matvec(v):
    def one(chunk):
      inputs, targets, extra = chunk
      outputs, jvp = jax.linearize(lambda p: model_fn(p, inputs), params)
      lam_jv = output_operator(outputs, targets, extra, jvp(v))
      (jt_lam_jv,) = jax.linear_transpose(jvp, params)(lam_jv)
      return jt_lam_jv

    return chunking.chunked_mean(one, batch, num_chunks)

  return matvec


def ggn_operator(
  model_fn: ModelFn,
  loss_of_outputs: LossOfOutputs,
  params: Any,
  batch: tuple[Any, Any],
  num_chunks: int = 1,
) -> Matvec:
  r"""The generalized Gauss-Newton matrix :math:`G = J^\top H_f J` as a product.

  With outputs :math:`f = f(w, X)` of ``model_fn`` and the Hessian
  :math:`H_f = \nabla^2_f \ell(f, Y)` of ``loss_of_outputs`` with respect to
  the outputs,

  .. math::

    G v = J^\top H_f J v, \qquad
    \nabla^2_w L = G + \sum_{i,c} \frac{\partial \ell}{\partial f_{ic}}
    \nabla^2_w f_{ic},

  so :math:`G` is the Hessian without the model's own curvature: positive
  semi-definite whenever the loss is convex in the outputs (squared error,
  softmax cross-entropy), and equal to the Hessian for a model linear in
  ``params``. For softmax cross-entropy it equals the true Fisher
  (:func:`fisher_operator` with ``kind='true'``); for the squared error
  :math:`\frac{1}{2n} \sum_i \|f_i - y_i\|^2` it is :math:`J^\top J / n`.

  Cost: a forward pass, one Jacobian-vector and one vector-Jacobian product
  per call, and the output-space Hessian-vector product (cheap).

  Args:
    model_fn: ``model_fn(params, inputs) -> outputs``.
    loss_of_outputs: ``loss_of_outputs(outputs, targets) -> scalar``, a mean
      over the batch when ``num_chunks > 1``.
    params: the point :math:`w`.
    batch: ``(inputs, targets)``.
    num_chunks: evaluate each product over this many chunks of ``batch``
      (static).

  Returns:
    ``matvec(v) -> Gv`` for ``v`` like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> model_fn = lambda p, x: x @ p
    >>> loss = lambda out, y: 0.5 * jnp.mean((out - y) ** 2)
    >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> gv = sharpness.ggn_operator(model_fn, loss, jnp.zeros(2), (x, jnp.zeros(2)))
    >>> print(gv(jnp.array([1.0, 0.0])))  # X^T X / 2 times e_1
    [1. 1.]

  References:
    Schraudolph, 2002, "Fast Curvature Matrix-Vector Products for
    Second-Order Gradient Descent", Neural Computation 14; Martens, 2020,
    `New Insights and Perspectives on the Natural Gradient Method
    <https://arxiv.org/abs/1412.1193>`_.
  """

  def hessian_of_loss(outputs, targets, _, u):
    grad = jax.grad(lambda o: loss_of_outputs(o, targets))
    return jax.jvp(grad, (outputs,), (u,))[1]

  inputs, targets = batch
  return _output_space_operator(
    model_fn, hessian_of_loss, params, (inputs, targets, None), num_chunks
  )


def _per_example_outer(e: Any, u: Any, scale: jax.Array) -> Any:
  r"""``scale * e_i (e_i . u_i)`` for every example ``i`` (the leading axis of the leaves)."""
  dots = sum(
    jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)
    for a, b in zip(jax.tree.leaves(e), jax.tree.leaves(u), strict=True)
  )
  return jax.tree.map(lambda a: scale * a * dots.reshape((-1,) + (1,) * (a.ndim - 1)), e)


def _empirical(loss_of_outputs: LossOfOutputs) -> _OutputOperator:
  """``Lambda u = (1/n) sum_i e_i e_i^T u_i``, ``e_i`` the gradient of example ``i``'s loss."""

  def operator(outputs, targets, _, u):
    grad = jax.grad(lambda o: loss_of_outputs(o, targets))(outputs)  # e_i / n
    n = jax.tree.leaves(outputs)[0].shape[0]
    return _per_example_outer(grad, u, n)

  return operator


def _true(likelihood: str, num_samples: int) -> _OutputOperator:
  """The output-space Fisher of ``likelihood``: exact, or from the sampled labels in ``noise``."""

  def residual(outputs, noise):  # e = grad_f -log p(y | f) for a label y drawn with noise
    if likelihood == 'gaussian':  # y = f + noise, e = f - y (its sign does not matter)
      return noise
    sampled = jnp.argmax(outputs + noise, axis=-1)  # the Gumbel-max trick: y ~ softmax(f)
    return jax.nn.softmax(outputs, axis=-1) - jax.nn.one_hot(sampled, outputs.shape[-1])

  def operator(outputs, _, noise, u):
    n = outputs.shape[0]
    if noise is not None:  # (1/S) sum_s e_s e_s^T per example
      scale = 1 / (n * num_samples)
      terms = [
        _per_example_outer(residual(outputs, noise[:, s]), u, scale) for s in range(num_samples)
      ]
      return sum(terms[1:], terms[0])
    if likelihood == 'gaussian':
      return u / n
    p = jax.nn.softmax(outputs, axis=-1)  # (diag(p) - p p^T) u at every example and position
    return (p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)) / n

  return operator


def fisher_operator(
  model_fn: ModelFn,
  params: Any,
  batch: tuple[Any, Any],
  *,
  kind: str = 'empirical',
  loss_of_outputs: Optional[LossOfOutputs] = None,
  likelihood: str = 'categorical',
  key: Optional[jax.Array] = None,
  num_samples: int = 1,
  num_chunks: int = 1,
) -> Matvec:
  r"""The empirical or the true Fisher information matrix as a product.

  *Empirical* (``kind='empirical'``): the mean outer product of the
  per-example gradients :math:`g_i = \nabla_w \ell_i` of ``loss_of_outputs``,

  .. math::

    F_{\mathrm{emp}} v = \frac{1}{n} \sum_i g_i \, (g_i^\top v)
    = J^\top \Lambda J v, \qquad
    \Lambda = \frac1n \operatorname{blockdiag}_i(e_i e_i^\top), \quad
    e_i = \nabla_{f_i} \ell_i,

  computed from the gradient of the mean loss with respect to the outputs
  (:math:`e_i / n`), with no per-example gradient in parameter space.

  *True* (``kind='true'``): the expectation over labels drawn from the model,

  .. math::

    F v = \frac{1}{n} \sum_i J_i^\top \, \mathbb{E}_{y \sim p(\cdot | f_i)}
    [\nabla_f \log p(y | f_i) \nabla_f \log p(y | f_i)^\top] \, J_i v,

  with ``likelihood='categorical'`` (outputs are logits, softmax over the last
  axis: the inner matrix is :math:`\operatorname{diag}(p_i) - p_i p_i^\top`,
  so :math:`F` equals the GGN of softmax cross-entropy) or ``'gaussian'``
  (outputs are means of a unit-variance Gaussian: the inner matrix is
  :math:`I`, the GGN of :math:`\frac{1}{2n} \sum_i \|f_i - y_i\|^2`). With
  ``key=None`` the expectation is exact; with a ``key`` it is replaced by
  ``num_samples`` labels drawn per example (the Monte Carlo Fisher of K-FAC,
  unbiased); the labels are drawn once, so the operator is one fixed matrix.

  Every leaf of the outputs has the examples on its leading axis, and
  ``loss_of_outputs`` is a mean of per-example terms.

  Cost: as :func:`ggn_operator`.

  Args:
    model_fn: ``model_fn(params, inputs) -> outputs``.
    params: the point :math:`w`.
    batch: ``(inputs, targets)``; the targets are used by the empirical Fisher only.
    kind: ``'empirical'`` or ``'true'``.
    loss_of_outputs: ``loss_of_outputs(outputs, targets) -> scalar``, the mean
      over the batch of per-example losses (needed for ``kind='empirical'``).
    likelihood: ``'categorical'`` or ``'gaussian'`` (``kind='true'``).
    key: ``None`` for the exact true Fisher, or a PRNG key for sampled labels.
    num_samples: labels drawn per example when ``key`` is given (static).
    num_chunks: evaluate each product over this many chunks of ``batch``
      (static).

  Returns:
    ``matvec(v) -> Fv`` for ``v`` like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> model_fn = lambda p, x: x * p
    >>> loss = lambda out, y: 0.5 * jnp.mean((out - y) ** 2)
    >>> batch = (jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]))
    >>> fv = sharpness.fisher_operator(model_fn, jnp.array(1.0), batch, loss_of_outputs=loss)
    >>> print(fv(jnp.array(1.0)))  # mean of g_i^2 = (x_i^2)^2: (1 + 16) / 2
    8.5

  References:
    Martens, 2020, `New Insights and Perspectives on the Natural Gradient
    Method <https://arxiv.org/abs/1412.1193>`_; Kunstner, Balles and Hennig,
    2019, `Limitations of the Empirical Fisher Approximation for Natural
    Gradient Descent <https://arxiv.org/abs/1905.12558>`_; Martens and Grosse,
    2015, `Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature <https://arxiv.org/abs/1503.05671>`_.
  """
  numerics.check_integer('num_samples', num_samples)
  inputs, targets = batch
  if kind == 'empirical':
    if loss_of_outputs is None:
      raise ValueError("kind='empirical' needs loss_of_outputs(outputs, targets).")
    output_operator, noise = _empirical(loss_of_outputs), None
  elif kind == 'true':
    if likelihood not in ('categorical', 'gaussian'):
      raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}.")
    output_operator, noise = _true(likelihood, num_samples), None
    if key is not None:
      out = jax.eval_shape(model_fn, params, inputs)
      shape = (out.shape[0], num_samples, *out.shape[1:])
      sampler = jax.random.normal if likelihood == 'gaussian' else jax.random.gumbel
      noise = sampler(key, shape, out.dtype)
  else:
    raise ValueError(f"kind must be 'empirical' or 'true', got {kind!r}.")
  return _output_space_operator(
    model_fn, output_operator, params, (inputs, targets, noise), num_chunks
  )
