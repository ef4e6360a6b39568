r"""Average-case and worst-case sharpness, adaptive or not (Andriushchenko et al., 2023).

With the scale :math:`c = |w|` (adaptive) or :math:`c = 1` (not adaptive),

.. math::

  S_{avg}^\rho(w, c) = \mathbb{E}_{\delta \sim \mathcal N(0, \rho^2 \operatorname{diag}(c^2))}
    L(w + \delta) - L(w), \qquad
  S_{max}^\rho(w, c) = \max_{\|\delta \odot c^{-1}\|_p \le \rho} L(w + \delta) - L(w),

on the batch given (Andriushchenko et al. take the expectation of these over
batches of ``m`` examples, "m-sharpness": call the functions per batch and
average). The adaptive versions are invariant under the rescalings that leave
a ReLU network's function unchanged (layer ``l`` times :math:`a`, layer
``l + 1`` times :math:`1/a`), the non-adaptive ones are not.

References:
  Andriushchenko, Croce, Müller, Hein and Flammarion, 2023, "A Modern Look at
  the Relationship between Sharpness and Generalization":
  https://arxiv.org/abs/2302.07011; Kwon et al., 2021, "ASAM":
  https://arxiv.org/abs/2102.11600
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_sam._src import numerics
from optax_sam._src.diagnostics import chunking
from optax_sam._src.diagnostics import hvp as hvp_lib

DEFAULT_AVERAGE_SAMPLES = 32
DEFAULT_ASCENT_STEPS = 20


class AverageSharpness(NamedTuple):
  """Output of :func:`average_sharpness`.

  Attributes:
    sharpness: the Monte Carlo estimate of :math:`S_{avg}`.
    stderr: its standard error over the samples.
    clean_loss: :math:`L(w)`.
  """

  sharpness: jax.Array
  stderr: jax.Array
  clean_loss: jax.Array


class WorstCaseSharpness(NamedTuple):
  """Output of :func:`worst_case_sharpness`.

  Attributes:
    sharpness: ``perturbed_loss - clean_loss``, a lower bound of
      :math:`S_{max}` (the best feasible point found).
    clean_loss: :math:`L(w)`.
    perturbed_loss: :math:`L(w + \\delta)` at the best point found.
    perturbation: that :math:`\\delta`, like ``params``.
  """

  sharpness: jax.Array
  clean_loss: jax.Array
  perturbed_loss: jax.Array
  perturbation: Any


def _scale(params: Any, adaptive: bool) -> Any:
  if adaptive:
    return jax.tree.map(jnp.abs, params)
  return jax.tree.map(jnp.ones_like, params)


def _check_rho(rho: Any) -> None:
  numerics.check_range('rho', rho)


def average_sharpness(
  loss_fn: hvp_lib.LossFn,
  params: Any,
  batch: Any,
  *,
  key: jax.Array,
  rho: float = 0.1,
  adaptive: bool = False,
  num_samples: int = DEFAULT_AVERAGE_SAMPLES,
  num_chunks: int = 1,
) -> AverageSharpness:
  r"""Average-case sharpness: the expected loss increase under Gaussian weight noise.

  .. math::

    S_{avg}^\rho = \mathbb{E}_{\xi \sim \mathcal N(0, I)} L(w + \rho\, c \odot \xi) - L(w)
    \approx \frac{1}{N} \sum_{s=1}^{N} L(w + \rho\, c \odot \xi_s) - L(w),

  :math:`c = |w|` elementwise when ``adaptive`` (relative noise), else
  :math:`c = 1`. ``stderr`` is the sample standard deviation over
  :math:`\sqrt N`. To second order it is :math:`\frac{\rho^2}{2}
  \operatorname{tr}(\operatorname{diag}(c) H \operatorname{diag}(c))`.

  Cost: ``num_samples + 1`` loss evaluations (forward passes only; default
  33).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point :math:`w`.
    batch: the data.
    key: PRNG key of the noise.
    rho: noise scale (``>= 0``).
    adaptive: scale the noise by :math:`|w|`.
    num_samples: Monte Carlo samples (static, ``>= 2``).
    num_chunks: evaluate each loss over this many chunks of ``batch``
      (static).

  Returns:
    An :class:`AverageSharpness`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(w ** 2)  # exactly rho^2 n / 2 = 0.02
    >>> r = sharpness.average_sharpness(loss_fn, jnp.zeros(4), None, key=jax.random.key(0),
    ...                                 rho=0.1, num_samples=1000)
    >>> bool(abs(r.sharpness - 0.02) < 3 * r.stderr)
    True

  References:
    Andriushchenko et al., 2023: https://arxiv.org/abs/2302.07011
  """
  _check_rho(rho)
  chunking.check_num_chunks(num_chunks)
  numerics.check_integer('num_samples', num_samples)
  if num_samples < 2:
    raise ValueError(f'num_samples must be >= 2 to estimate the error, got {num_samples}.')
  c = _scale(params, adaptive)
  clean_loss = hvp_lib.loss(loss_fn, params, batch, num_chunks)
  dtype = numerics.accumulation_dtype(params)

  def one(k):
    xi = hvp_lib.random_like(k, params, 'normal')
    noisy = jax.tree.map(lambda w, s, z: w + (rho * s * z).astype(w.dtype), params, c, xi)
    return hvp_lib.loss(loss_fn, noisy, batch, num_chunks).astype(dtype) - clean_loss

  samples = jax.lax.map(one, jax.random.split(key, num_samples))
  mean = jnp.mean(samples)
  std = jnp.sqrt(jnp.sum((samples - mean) ** 2) / (num_samples - 1))
  return AverageSharpness(sharpness=mean, stderr=std / jnp.sqrt(num_samples), clean_loss=clean_loss)


def worst_case_sharpness(
  loss_fn: hvp_lib.LossFn,
  params: Any,
  batch: Any,
  *,
  key: jax.Array,
  rho: float = 0.05,
  adaptive: bool = False,
  norm: str = 'l2',
  num_steps: int = DEFAULT_ASCENT_STEPS,
  step_size: float | None = None,
  num_chunks: int = 1,
) -> WorstCaseSharpness:
  r"""Worst-case sharpness: the largest loss increase in a (scaled) ball, by projected ascent.

  .. math::

    S_{max}^\rho = \max_{\|u\|_p \le \rho} L(w + c \odot u) - L(w),

  :math:`c = |w|` when ``adaptive``, else 1, :math:`p = 2` or :math:`\infty`
  (``norm='l2'`` or ``'linf'``; Andriushchenko et al. report both). The
  maximum is searched by projected gradient ascent in :math:`u`, from a random
  start :math:`u_0` (a random direction of norm :math:`\rho/2`, or uniform
  entries in :math:`[-\rho/2, \rho/2]`, drawn from ``key``: at a minimum the
  gradient at :math:`u = 0` vanishes), with step sizes
  :math:`\eta_t = \eta_0 \cdot \frac12 (1 + \cos(\pi t / T))`:

  .. math::

    u \leftarrow \Pi_{\|u\|_2 \le \rho}\Big(u + \eta_t \frac{c \odot \nabla L}{\|c \odot
    \nabla L\|}\Big) \;(p = 2), \qquad
    u \leftarrow \operatorname{clip}_{[-\rho, \rho]}\big(u + \eta_t \operatorname{sign}(c
    \odot \nabla L)\big) \;(p = \infty).

  Every iterate is feasible and the best one is returned, so ``sharpness``
  is a lower bound of :math:`S_{max}` that tightens with ``num_steps`` (the
  paper uses Auto-PGD; a fixed-schedule ascent keeps the cost static). For a
  quadratic with :math:`w` at its minimum and ``norm='l2'``, the maximum is
  :math:`\frac{\rho^2}{2} \lambda_{max}`.

  Cost: ``num_steps`` gradients and two loss evaluations (default 20
  gradients).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point :math:`w`.
    batch: the data.
    key: PRNG key of the random start.
    rho: radius (``>= 0``).
    adaptive: scale the ball by :math:`|w|`.
    norm: ``'l2'`` or ``'linf'``.
    num_steps: ascent steps (static).
    step_size: :math:`\eta_0` (default ``rho``).
    num_chunks: evaluate each loss and gradient over this many chunks of
      ``batch`` (static).

  Returns:
    A :class:`WorstCaseSharpness`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w ** 2)
    >>> r = sharpness.worst_case_sharpness(loss_fn, jnp.zeros(2), None, key=jax.random.key(0),
    ...                                    rho=0.1)
    >>> print(f'{float(r.sharpness):.4f}')  # rho^2 lambda_max / 2
    0.0200

  References:
    Andriushchenko et al., 2023: https://arxiv.org/abs/2302.07011
  """
  _check_rho(rho)
  chunking.check_num_chunks(num_chunks)
  numerics.check_integer('num_steps', num_steps)
  if norm not in ('l2', 'linf'):
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}.")
  if step_size is not None:
    numerics.check_range('step_size', step_size)
  eta0 = rho if step_size is None else step_size
  c = _scale(params, adaptive)
  dtype = numerics.accumulation_dtype(params)

  def at(u):
    return jax.tree.map(lambda w, s, x: w + (s * x).astype(w.dtype), params, c, u)

  def project(u):
    if norm == 'linf':
      return jax.tree.map(lambda x: jnp.clip(x, -rho, rho).astype(x.dtype), u)
    n = numerics.global_norm(u)
    return numerics.scale_tree(u, jnp.minimum(1, numerics.safe_ratio(jnp.asarray(rho, n.dtype), n)))

  if norm == 'l2':
    u0 = hvp_lib.random_like(key, params, 'normal')
    u0 = numerics.scale_tree(u0, numerics.safe_ratio(0.5 * rho, numerics.global_norm(u0)))
  else:
    u0 = jax.tree.map(lambda x: 0.5 * rho * x, hvp_lib.random_like(key, params, 'uniform'))
  clean_loss = hvp_lib.loss(loss_fn, params, batch, num_chunks).astype(dtype)

  def step(t, carry):
    u, best_u, best = carry
    value, g = hvp_lib.loss_and_grad(loss_fn, at(u), batch, num_chunks)
    value = value.astype(dtype)
    better = value > best
    best_u = jax.tree.map(lambda b, x: jnp.where(better, x, b), best_u, u)
    best = jnp.where(better, value, best)
    g = jax.tree.map(lambda s, x: (s * x).astype(x.dtype), c, g)
    eta = eta0 * 0.5 * (1 + jnp.cos(jnp.pi * t / num_steps))
    if norm == 'l2':
      direction = numerics.scale_tree(g, numerics.safe_ratio(eta, numerics.global_norm(g)))
    else:
      direction = jax.tree.map(lambda x: (eta * jnp.sign(x)).astype(x.dtype), g)
    return project(jax.tree.map(jnp.add, u, direction)), best_u, best

  u, best_u, best = jax.lax.fori_loop(0, num_steps, step, (u0, u0, jnp.asarray(-jnp.inf, dtype)))
  last = hvp_lib.loss(loss_fn, at(u), batch, num_chunks).astype(dtype)
  better = last > best
  best_u = jax.tree.map(lambda b, x: jnp.where(better, x, b), best_u, u)
  best = jnp.where(better, last, best)
  delta = jax.tree.map(lambda s, x: (s * x).astype(x.dtype), c, best_u)
  return WorstCaseSharpness(
    sharpness=best - clean_loss, clean_loss=clean_loss, perturbed_loss=best, perturbation=delta
  )
