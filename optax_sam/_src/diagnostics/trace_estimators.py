"""Randomized estimates of the Hessian's trace: Hutchinson and Hutch++, with standard errors."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_sam._src import numerics
from optax_sam._src.diagnostics import chunking, tree_basis
from optax_sam._src.diagnostics import hvp as hvp_lib
from optax_sam._src.diagnostics import lanczos as lanczos_lib

DEFAULT_TRACE_PROBES = 60


class HessianTrace(NamedTuple):
  """Output of :func:`hessian_trace`.

  Attributes:
    estimate: the trace estimate.
    stderr: its standard error (see :func:`hessian_trace` for Hutch++).
  """

  estimate: jax.Array
  stderr: jax.Array


def _mean_and_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
  n = samples.shape[0]
  mean = jnp.mean(samples)
  std = jnp.sqrt(jnp.sum((samples - mean) ** 2) / (n - 1))
  return mean, std / jnp.sqrt(n)


def hessian_trace(
  loss_fn: hvp_lib.LossFn,
  params: Any,
  batch: Any,
  *,
  key: jax.Array,
  num_probes: int = DEFAULT_TRACE_PROBES,
  method: str = 'hutchinson',
  num_chunks: int = 1,
) -> HessianTrace:
  r"""The trace of the loss Hessian, by Hutchinson's or the Hutch++ estimator.

  *Hutchinson*: with :math:`N` Rademacher probes :math:`z_i`,

  .. math::

    \widehat{\operatorname{tr}} = \frac{1}{N} \sum_i z_i^\top H z_i, \qquad
    \mathrm{se} = \frac{s}{\sqrt N},

  :math:`s` the sample standard deviation of the :math:`z_i^\top H z_i`. It is
  unbiased, exact when :math:`H` is diagonal (every sample is the trace, so
  ``stderr`` is 0), and its variance is :math:`2 \sum_{i \ne j} H_{ij}^2 / N`.

  *Hutch++* (Meyer et al.) spends the :math:`N` products in three parts:
  :math:`s = \lfloor N / 3 \rfloor` products :math:`Y = H S` of a Rademacher
  sketch, an orthonormal basis :math:`Q` of :math:`Y` (rank revealed: a
  Hessian of rank :math:`r < s` gives :math:`r` columns), :math:`s` products
  for the exact trace of :math:`Q^\top H Q`, and the :math:`N - 2s` left for
  Hutchinson on the deflated :math:`(I - QQ^\top) H (I - QQ^\top)`:

  .. math::

    \widehat{\operatorname{tr}} = \operatorname{tr}(Q^\top H Q) +
    \frac{1}{N - 2s} \sum_i g_i^\top (I - QQ^\top) H (I - QQ^\top) g_i.

  Its ``stderr`` is the standard error of the deflated Hutchinson part
  *conditional on the sketch* (the first term has no variance given
  :math:`Q`); it is exact (0 error, 0 stderr) when :math:`H` has rank at most
  :math:`s`, and its error falls as :math:`1/N` rather than
  :math:`1/\sqrt N` when the spectrum decays fast.

  Cost: ``num_probes`` Hessian-vector products (default 60); Hutch++ also
  stores ``num_probes // 3`` parameter copies.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point :math:`w`.
    batch: the data.
    key: PRNG key of the probes.
    num_probes: number of Hessian-vector products (static; ``>= 2`` for
      Hutchinson, ``>= 4`` for Hutch++, so that the error can be estimated).
    method: ``'hutchinson'`` or ``'hutch++'``.
    num_chunks: chunks per product (static), see
      :func:`optax_sam.sharpness.hessian_eigenvalues`.

  Returns:
    A :class:`HessianTrace`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> h = jnp.array([3.0, 1.0, 2.0])
    >>> loss_fn = lambda p, batch: 0.5 * jnp.sum(h * p ** 2)
    >>> r = sharpness.hessian_trace(loss_fn, jnp.zeros(3), None, key=jax.random.key(0))
    >>> print(f'{float(r.estimate):.3f} +- {float(r.stderr):.3f}')  # diagonal: exact
    6.000 +- 0.000

  References:
    Hutchinson, 1990, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", Comm. Statist. Simulation
    Comput. 19; Meyer, Musco, Musco and Woodruff, 2021, "Hutch++: Optimal
    Stochastic Trace Estimation": https://arxiv.org/abs/2010.09649;
    Yao et al., 2020, "PyHessian": https://arxiv.org/abs/1912.07145
  """
  chunking.check_num_chunks(num_chunks)
  if method not in ('hutchinson', 'hutch++'):
    raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}.")
  low = 2 if method == 'hutchinson' else 4
  numerics.check_integer(f'num_probes (for {method})', num_probes, low)
  hvp = hvp_lib.hvp_fn(loss_fn, params, batch, num_chunks)
  dtype = numerics.accumulation_dtype(params)

  def quadratic_form(z):
    return numerics.vdot(z, hvp(z)).astype(dtype)

  if method == 'hutchinson':
    keys = jax.random.split(key, num_probes)
    samples = jax.lax.map(
      lambda k: quadratic_form(hvp_lib.random_like(k, params, 'rademacher')), keys
    )
    estimate, stderr = _mean_and_stderr(samples)
    return HessianTrace(estimate=estimate, stderr=stderr)

  s = num_probes // 3
  sketch_key, probe_key = jax.random.split(key)
  sketch = jax.lax.map(
    lambda k: hvp(hvp_lib.random_like(k, params, 'rademacher')), jax.random.split(sketch_key, s)
  )
  q, _ = tree_basis.orthonormalize(sketch, lanczos_lib.default_rtol(dtype))
  exact_part = jnp.sum(jax.lax.map(quadratic_form, q))

  def deflated(k):
    g = tree_basis.project_out(q, hvp_lib.random_like(k, params, 'rademacher'))
    return quadratic_form(g)

  samples = jax.lax.map(deflated, jax.random.split(probe_key, num_probes - 2 * s))
  mean, stderr = _mean_and_stderr(samples)
  return HessianTrace(estimate=exact_part + mean, stderr=stderr)
