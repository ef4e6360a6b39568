"""Randomized estimates of an operator's diagonal: Hutchinson's and XDiag, with standard errors."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_sam._src import numerics
from optax_sam._src.diagnostics import exchangeable
from optax_sam._src.diagnostics import hvp as hvp_lib

DEFAULT_DIAGONAL_PROBES = 60


class Diagonal(NamedTuple):
  """Output of :func:`diagonal`.

  Attributes:
    estimate: the diagonal, like ``params`` (entry by entry).
    stderr: the standard error of each entry, like ``params``.
  """

  estimate: Any
  stderr: Any


def _hutchinson(matvec, params, key, num_probes):
  """Running mean and sum of squared deviations of ``z * Mz`` (Welford), one probe at a time."""
  dtype = numerics.accumulation_dtype(params)
  zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), dtype), params)
  probe = hvp_lib.rademacher_probes(key, params, num_probes)

  def body(i, carry):
    mean, m2 = carry
    z = probe(i)
    sample = jax.tree.map(lambda a, b: (a * b).astype(dtype), z, matvec(z))
    delta = jax.tree.map(jnp.subtract, sample, mean)
    mean = jax.tree.map(lambda m, d: m + d / (i + 1), mean, delta)
    m2 = jax.tree.map(lambda s, d, x, m: s + d * (x - m), m2, delta, sample, mean)
    return mean, m2

  mean, m2 = jax.lax.fori_loop(0, num_probes, body, (zeros, zeros))
  stderr = jax.tree.map(lambda s: jnp.sqrt(s / ((num_probes - 1) * num_probes)), m2)
  return mean, stderr


def diagonal(
  matvec: Callable[[Any], Any],
  params: Any,
  *,
  key: jax.Array,
  num_probes: int = DEFAULT_DIAGONAL_PROBES,
  method: str = 'hutchinson',
) -> Diagonal:
  r"""The diagonal of a symmetric operator :math:`M`, by Hutchinson's estimator or XDiag.

  *Hutchinson* (Bekas et al.): with :math:`N` Rademacher probes :math:`z_i`,

  .. math::

    \widehat{\operatorname{diag}}(M) = \frac{1}{N} \sum_i z_i \odot M z_i,
    \qquad \mathbb{E}[z \odot Mz]_j = \sum_k M_{jk} \mathbb{E}[z_j z_k] = M_{jj},

  unbiased, exact on a diagonal :math:`M` (each entry's variance is
  :math:`\sum_{k \ne j} M_{jk}^2`); ``stderr`` is each entry's sample standard
  deviation over :math:`\sqrt N`. The probes run one after another, with a
  running mean (Welford), so memory is two vectors and the probes' signs, drawn
  up front as bits (a 32-bit word per entry for every 32 probes).

  *XDiag* (Epperly et al.): the diagonal analogue of XTrace, with
  :math:`m = \lfloor N / 2 \rfloor` probes; each leave-one-out estimate is
  the diagonal of the low-rank :math:`Q_{(i)} Q_{(i)}^\top M` plus Hutchinson
  on the rest with probe :math:`i`,

  .. math::

    \hat d_i = \operatorname{diag}(Q_{(i)} Q_{(i)}^\top M) +
    \omega_i \odot (I - Q_{(i)} Q_{(i)}^\top) M \omega_i,

  and the estimate is their mean. The :math:`\hat d_i` share sketches, so
  they are correlated, and their spread alone (the paper's error estimate)
  is optimistic; as for XTrace (see :func:`trace`), ``stderr`` adds to it
  the covariance of each pair, estimated without bias from the estimates
  that leave out two probes, entry by entry:

  .. math::

    \mathrm{stderr}^2 = \frac{s^2}{m} + \frac{1}{m(m-1)} \sum_{i \ne j}
    (\hat d_i - \hat d_{i \mid j}) \odot (\hat d_j - \hat d_{j \mid i}),

  with :math:`s^2` the sample variance of the :math:`\hat d_i` (clipped at
  0 where the sum is negative). Exact when :math:`m - 1` is at least the rank of :math:`M` (in
  particular when ``num_probes >= 2 (n + 1)``); far more accurate than
  Hutchinson when the spectrum decays fast. Stores about ``4 num_probes`` vectors.

  Args:
    matvec: ``matvec(v) -> Mv`` for ``v`` like ``params`` (symmetric :math:`M`).
    params: a template of the vectors (their structure, shapes and dtypes).
    key: PRNG key of the probes.
    num_probes: number of products (static; ``>= 2`` for Hutchinson, ``>= 4``
      for XDiag).
    method: ``'hutchinson'`` or ``'xdiag'``.

  Returns:
    A :class:`Diagonal`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam import sharpness
    >>> a = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    >>> r = sharpness.diagonal(lambda v: a @ v, jnp.zeros(3), key=jax.random.key(0),
    ...                        num_probes=10, method='xdiag')  # 5 probes > 3 + 1: exact
    >>> print(' '.join(f'{x:.3f}' for x in r.estimate), float(jnp.max(r.stderr)) < 1e-5)
    2.000 3.000 4.000 True

  References:
    Bekas, Kokiopoulou and Saad, 2007, "An estimator for the diagonal of a
    matrix", Appl. Numer. Math. 57; Epperly, Tropp and Webber, 2024, `XTrace:
    Making the most of every sample in stochastic trace estimation
    <https://arxiv.org/abs/2301.07825>`_.
  """
  if method not in ('hutchinson', 'xdiag'):
    raise ValueError(f"method must be 'hutchinson' or 'xdiag', got {method!r}.")
  numerics.check_integer(
    f'num_probes (for {method})', num_probes, 2 if method == 'hutchinson' else 4
  )
  if method == 'hutchinson':
    return Diagonal(*_hutchinson(matvec, params, key, num_probes))
  sk = exchangeable.sketch(matvec, params, key, num_probes // 2)
  samples, covariance = exchangeable.xdiag_samples(sk), exchangeable.xdiag_covariance(sk)
  dtype = numerics.accumulation_dtype(params)
  m = num_probes // 2

  def mean_and_stderr(s, c):
    s = s.astype(dtype)
    variance = jnp.var(s, axis=0, ddof=1) / m + c
    return jnp.mean(s, axis=0), jnp.sqrt(jnp.maximum(variance, 0))

  pairs = jax.tree.map(mean_and_stderr, samples, covariance)
  outer, inner = jax.tree.structure(samples), jax.tree.structure((0, 0))
  return Diagonal(*jax.tree.transpose(outer, inner, pairs))
