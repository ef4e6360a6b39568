r"""Exchangeable trace and diagonal estimators: XTrace, XNysTrace and XDiag.

Hutch++ spends its products on two jobs, a low-rank sketch :math:`Q` and
Hutchinson probes of the rest. The exchangeable estimators of Epperly, Tropp
and Webber make every probe do both: with :math:`m` probes
:math:`\Omega = [\omega_1, \dots, \omega_m]`, estimate :math:`i` uses the
sketch of the other :math:`m - 1` probes and Hutchinson on probe :math:`i`,

.. math::

  \hat t_i = \operatorname{tr}(Q_{(i)}^\top A Q_{(i)}) +
  \omega_i^\top (I - Q_{(i)} Q_{(i)}^\top) A (I - Q_{(i)} Q_{(i)}^\top) \omega_i,
  \qquad Q_{(i)} = \operatorname{orth}(A \Omega_{-i}),

and the estimate is their mean. Each :math:`\hat t_i` is unbiased given the
other probes; the error estimate also needs the estimates that leave out two
probes (:func:`xtrace_samples`; see :func:`optax_sam.sharpness.trace`). All of
them come from one sketch,
:math:`A \Omega = Q R`: the direction that leaving probe :math:`i` out removes
from :math:`\operatorname{range}(Q)` is :math:`Q s_i`, with :math:`s_i` the
normalized column :math:`i` of :math:`R^{-\top}` (orthogonal to every other
column of :math:`R`), so :math:`Q_{(i)} Q_{(i)}^\top = Q Q^\top - Q s_i
s_i^\top Q^\top`, and every term reduces to :math:`m \times m` matrices.
When the sketch has lower rank than :math:`m` (an operator of rank below
:math:`m`, or fewer parameters than probes), leaving one probe out changes no
range: :math:`s_i = 0`, and the estimates are exact.

Vectors are stored as bases of :mod:`~optax_sam._src.diagnostics.tree_basis`
(the leaves of ``params`` with a leading axis); only the :math:`m \times m`
matrices are dense.

References:
  Epperly, Tropp and Webber, 2024, "XTrace: Making the most of every sample in
  stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45:
  https://arxiv.org/abs/2301.07825
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_sam._src import numerics
from optax_sam._src.diagnostics import hvp as hvp_lib
from optax_sam._src.diagnostics import lanczos as lanczos_lib
from optax_sam._src.diagnostics import tree_basis, vector_layout


def probes(key: jax.Array, params: Any, m: int, kind: str = 'rademacher') -> Any:
  """``m`` independent random vectors like ``params`` (:func:`hvp.random_like`), as a basis."""
  return jax.vmap(lambda k: hvp_lib.random_like(k, params, kind))(jax.random.split(key, m))


class Sketch(NamedTuple):
  """The randomized range finder :math:`Y = A \\Omega = Q R` and what XTrace and XDiag read off it.

  Attributes:
    omega, y, q, z: bases of ``m`` vectors: the probes :math:`\\Omega`,
      :math:`Y = A\\Omega`, an orthonormal basis :math:`Q` of
      :math:`\\operatorname{range}(Y)` (zero rows past its rank) and :math:`Z = AQ`.
    r: ``[m, m]`` :math:`R = Q^\\top Y`.
    s: ``[m, m]`` columns :math:`s_i` (zero when the sketch is rank deficient).
    w: ``[m, m]`` :math:`W = Q^\\top \\Omega`.
    h: ``[m, m]`` :math:`Q^\\top A Q`.
    t: ``[m, m]`` :math:`Z^\\top \\Omega = Q^\\top A^\\top \\Omega`.
    oy: ``[m]`` :math:`\\omega_i^\\top A \\omega_i`.
    oo: ``[m]`` :math:`\\|\\omega_i\\|^2`.
    rank: the rank of :math:`Q` (its nonzero rows).
  """

  omega: Any
  y: Any
  q: Any
  z: Any
  r: jax.Array
  s: jax.Array
  w: jax.Array
  h: jax.Array
  t: jax.Array
  oy: jax.Array
  oo: jax.Array
  rank: jax.Array


def sketch(
  matvec: Callable[[Any], Any], params: Any, key: jax.Array, m: int, kind: str = 'rademacher'
) -> Sketch:
  """The :class:`Sketch` of ``m`` probes of ``kind``: ``2 m`` products, ``4 m`` stored vectors."""
  omega = probes(key, params, m, kind)
  y = jax.lax.map(matvec, omega)
  q, kept = tree_basis.orthonormalize(y, lanczos_lib.default_rtol(numerics.accumulation_dtype(y)))
  z = jax.lax.map(matvec, q)
  r = tree_basis.gram(q, y)
  # R is upper triangular with a zero row where Q has none; a 1 there keeps the inverse finite.
  columns = jnp.linalg.inv(r + jnp.diag((~kept).astype(r.dtype))).T
  s = columns / jnp.linalg.norm(columns, axis=0) * jnp.all(kept)
  w, h, t = tree_basis.gram(q, omega), tree_basis.gram(q, z), tree_basis.gram(z, omega)
  oy, oo = tree_basis.row_dots(omega, y), tree_basis.row_dots(omega, omega)
  return Sketch(omega, y, q, z, r, s, w, h, t, oy, oo, jnp.sum(kept))


def _second_coefficients(first: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``[i, j]`` ``(alpha, beta)`` with ``alpha first[:, j] + beta first[:, i]`` the unit part of
  column ``j`` of ``first`` orthogonal to its column ``i`` (unit columns); both zero where
  ``i == j`` (or the columns are parallel, or zero)."""
  overlap = first.T @ first  # [i, j]
  # The length of the [k, i, j] difference itself, not sqrt(1 - overlap^2), which cancels to
  # rounding (not to 0) at i == j.
  length = jnp.linalg.norm(first[:, None, :] - first[:, :, None] * overlap[None], axis=0)
  keep = length > lanczos_lib.default_rtol(first.dtype) * jnp.linalg.norm(first, axis=0)[None]
  alpha = jnp.where(keep, 1 / jnp.where(keep, length, 1), 0)
  return alpha, -overlap * alpha


def _second_directions(first: jax.Array) -> jax.Array:
  """``[k, i, j]``: the unit part of column ``j`` of ``first`` orthogonal to its column ``i``.

  With ``first[:, i]`` it spans what leaving out probes ``i`` and ``j`` removes; zero where
  ``i == j`` (or the columns are parallel, or zero), so index ``[:, i, i]`` leaves out ``i`` alone.
  """
  alpha, beta = _second_coefficients(first)
  return first[:, None, :] * alpha[None] + first[:, :, None] * beta[None]


def xtrace_samples(sk: Sketch, n: int) -> jax.Array:
  r"""XTrace's estimates leaving out one probe (diagonal) and two (off the diagonal), normalized.

  Entry :math:`(i, j)` is probe :math:`i`'s estimate with the sketch of the
  probes other than :math:`i` and :math:`j`; :math:`(i, i)` is
  :math:`\hat t_i`. Leaving out a set :math:`S` of probes removes the span
  :math:`U_S` of the :math:`s_k, k \in S` from the sketch's coordinates, so
  with :math:`c = (I - U_S U_S^\top) w_i` the coordinates of the part of
  :math:`\omega_i` the rest captures, :math:`P = I - Q (I - U_S U_S^\top) Q^\top`
  of rank :math:`n_S` (``n`` minus the rank of the rest) and
  :math:`\|P \omega_i\|^2 = \|\omega_i\|^2 - \|c\|^2`,

  .. math::

    \hat t_{i \mid S} = \operatorname{tr} H - \operatorname{tr}(U_S^\top H U_S)
    + \frac{n_S}{\|P \omega_i\|^2}
    \left(\omega_i^\top y_i - c^\top (r_i + t_i) + c^\top H c\right).

  The factor is the paper's *improved* estimator: for Gaussian probes,
  :math:`P \omega_i` rescaled to length :math:`\sqrt{n_S}` is uniform on that
  sphere of :math:`\operatorname{range}(P)`, so each estimate stays unbiased
  and the spread of the probe's length no longer adds to its error.
  """
  u = _second_directions(sk.s)
  c = sk.w - sk.s * jnp.sum(sk.s * sk.w, axis=0)
  c = c[:, :, None] - u * jnp.einsum('kij,ki->ij', u, sk.w)[None]
  residual = (
    sk.oy[:, None]
    - jnp.einsum('kij,ki->ij', c, sk.r + sk.t)
    + jnp.sum(c * jnp.einsum('kl,lij->kij', sk.h, c), axis=0)
  )
  left = n - sk.rank + jnp.any(sk.s != 0, axis=0)[:, None] + jnp.any(u != 0, axis=0)
  length = sk.oo[:, None] - jnp.sum(c**2, axis=0)
  scale = jnp.where((left > 0) & (length > 0), left / jnp.where(length > 0, length, 1), 0)
  captured = (
    jnp.trace(sk.h)
    - jnp.sum(sk.s * (sk.h @ sk.s), axis=0)[:, None]
    - jnp.sum(u * jnp.einsum('kl,lij->kij', sk.h, u), axis=0)
  )
  return captured + scale * residual


def xdiag_samples(sk: Sketch) -> Any:
  r"""The ``m`` leave-one-out diagonal estimates of XDiag (symmetric :math:`A`), as a basis.

  .. math::

    \hat d_i = \operatorname{diag}(Q_{(i)} Q_{(i)}^\top A) +
    \omega_i \odot (I - Q_{(i)} Q_{(i)}^\top) A \omega_i
    = \sum_k q_k \odot z_k - Q s_i \odot Z s_i
    + \omega_i \odot (y_i - Q (r_i - s_i s_i^\top r_i)).
  """
  qs = tree_basis.combine(sk.q, sk.s.T)  # row i: Q s_i
  zs = tree_basis.combine(sk.z, sk.s.T)
  kept = tree_basis.combine(sk.q, (sk.r - sk.s * jnp.sum(sk.s * sk.r, axis=0)).T)
  return jax.tree.map(
    lambda q, z, a, b, om, y, p: jnp.sum(q * z, axis=0)[None] - a * b + om * (y - p),
    sk.q,
    sk.z,
    qs,
    zs,
    sk.omega,
    sk.y,
    kept,
  )


def xdiag_covariance(sk: Sketch) -> Any:
  r"""The mean over pairs :math:`i \ne j` of :math:`(\hat d_i - \hat d_{i \mid j}) \odot
  (\hat d_j - \hat d_{j \mid i})`, entry by entry, like ``params``.

  :math:`\hat d_{i \mid j}` is probe :math:`i`'s XDiag estimate with the sketch of the probes
  other than :math:`i` and :math:`j`, which removes from the coordinates of :math:`Q` also
  :math:`u_{ij}`, the unit part of :math:`s_j` orthogonal to :math:`s_i` (see
  :func:`xtrace_samples`). What that changes in :math:`\hat d_i` is

  .. math::

    \hat d_i - \hat d_{i \mid j} = Q u_{ij} \odot (Z u_{ij} - (u_{ij}^\top r_i)\, \omega_i),
    \qquad u_{ij} = \alpha_{ij} s_j + \beta_{ij} s_i,

  so each pair costs a few operations per entry on the stored :math:`Q S` and :math:`Z S`
  (:math:`O(m^2 n)` in all, a loop over :math:`i` holding :math:`m` vectors at a time). As
  for XTrace, each :math:`\hat d_i` is unbiased given the other probes, so this is an unbiased
  estimate of the covariance of :math:`\hat d_i` and :math:`\hat d_j`, entry by entry.
  """
  m = sk.s.shape[0]
  dtype = numerics.accumulation_dtype(sk.q)
  alpha, beta = _second_coefficients(sk.s)
  along = sk.s.T @ sk.r  # [j, i]: s_j^T r_i
  a = alpha * along.T + beta * jnp.diag(along)[:, None]  # [i, j]: u_ij^T r_i
  qs = tree_basis.combine(sk.q, sk.s.T)  # row j: Q s_j
  zs = tree_basis.combine(sk.z, sk.s.T)

  def add_pairs_of(i, total):
    def leaf(total, qs, zs, omega):
      qs, zs, omega = qs.astype(dtype), zs.astype(dtype), omega.astype(dtype)
      col = lambda x: x.reshape((m,) + (1,) * (qs.ndim - 1))  # noqa: E731
      qs_i, zs_i, omega_i = qs[i], zs[i], omega[i]
      # Row j: d_i - d_i|j, then d_j - d_j|i.
      ij = (col(alpha[i]) * qs + col(beta[i]) * qs_i) * (
        col(alpha[i]) * zs + col(beta[i]) * zs_i - col(a[i]) * omega_i
      )
      ji = (col(alpha[:, i]) * qs_i + col(beta[:, i]) * qs) * (
        col(alpha[:, i]) * zs_i + col(beta[:, i]) * zs - col(a[:, i]) * omega
      )
      return total + jnp.sum(ij * ji, axis=0)

    return jax.tree.map(leaf, total, qs, zs, sk.omega)

  zeros = jax.tree.map(lambda b: jnp.zeros(b.shape[1:], dtype), sk.q)
  return numerics.scale_tree(jax.lax.fori_loop(0, m, add_pairs_of, zeros), 1 / (m * (m - 1)))


def xnystrace_samples(
  matvec: Callable[[Any], Any], params: Any, key: jax.Array, m: int
) -> jax.Array:
  r"""XNysTrace's estimates leaving out one probe and two, for a positive semi-definite :math:`A`.

  Entry :math:`(i, i)` is :math:`\hat t_i` below; :math:`(i, j)` the same
  with the Nystrom approximation of the probes other than :math:`i` and
  :math:`j` (a rank-two downdate, :func:`_leave_out`), rescaled to
  :math:`n - m + 2`.

  The Nystrom approximation :math:`\hat A = Y (\Omega^\top Y)^{-1} Y^\top`
  of the ``m`` probes, and :math:`\hat A_{(i)}` of all but probe :math:`i`:
  with :math:`\Omega^\top Y = L L^\top`, :math:`Y = QR`,
  :math:`B = R L^{-\top}` (so :math:`\hat A = Q B B^\top Q^\top`) and
  :math:`x_i = L^{-1} e_i`, removing probe :math:`i` downdates
  :math:`(\Omega^\top Y)^{-1}` by a rank-one term, and

  .. math::

    \hat t_i = \operatorname{tr} \hat A_{(i)} + \frac{n - m + 1}{\|P_i \omega_i\|^2}
    \omega_i^\top (A - \hat A_{(i)}) \omega_i
    = \|B\|_F^2 - \frac{\|B x_i\|^2}{\|x_i\|^2} + \frac{(n - m + 1)\, G^{-1}_{ii}}{\|x_i\|^2},

  where :math:`A - \hat A_{(i)}` vanishes on the other probes, :math:`P_i`
  projects them out and :math:`\|P_i \omega_i\|^2 = 1 / G^{-1}_{ii}` with
  :math:`G = \Omega^\top \Omega`: the paper's *improved* estimator, which
  rescales the Gaussian probe's residual to the length of a uniform one (see
  :func:`xtrace_samples`).

  As in the paper, :math:`A + \nu I` is sketched and :math:`\nu n`
  subtracted, which keeps the Cholesky factor finite for low-rank :math:`A`;
  here :math:`\nu = 10 m \epsilon \|Y\|_F / \sqrt n`, 10 m times the
  paper's, above Cholesky's backward error in float32 too. Costs ``m``
  products, stores ``3 m`` vectors.
  """
  omega = probes(key, params, m, 'normal')
  y = jax.lax.map(matvec, omega)
  n = vector_layout.num_params(params)
  scale = jnp.sqrt(numerics.vdot(y, y) / n)
  nu = 10 * m * jnp.finfo(scale.dtype).eps * jnp.where(scale > 0, scale, 1)
  y = jax.tree.map(lambda a, b: a + (nu * b).astype(a.dtype), y, omega)
  q, _ = tree_basis.orthonormalize(y, 0.0)
  lower = _cholesky(tree_basis.gram(omega, y))
  b = jax.scipy.linalg.solve_triangular(lower, tree_basis.gram(q, y).T, lower=True).T
  first, second, residual = _leave_out(lower)
  captured = (
    jnp.sum(b**2)
    - jnp.sum((b @ first) ** 2, axis=0)[:, None]
    - jnp.sum(jnp.einsum('pk,kij->pij', b, second) ** 2, axis=0)
  )
  *_, length = _leave_out(_cholesky(tree_basis.gram(omega, omega)))  # ||P omega_i||^2
  left = n - m + 1 + jnp.any(second != 0, axis=0)
  samples = captured + left / length * residual - nu * n
  return jnp.where(scale > 0, samples, 0)  # A Omega = 0: A = 0 (almost surely)


def _cholesky(gram: jax.Array) -> jax.Array:
  return jnp.linalg.cholesky(0.5 * (gram + gram.T))


def _leave_out(lower: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""What leaving out probes ``i`` and ``j`` removes from a Nystrom core :math:`K = L L^\top`.

  For :math:`K = \Omega^\top A \Omega`: the unit directions ``first``
  (``[k, i]``, :math:`L^{-1} e_i` normalized) and ``second`` (``[k, i, j]``,
  see :func:`_second_directions`) that span the removed part, and ``[i, j]``
  :math:`\omega_i^\top (A - \hat A_{(ij)}) \omega_i`, which is
  :math:`\|U^\top L^\top e_i\|^2` with :math:`U` those directions
  (:math:`1 / (K^{-1})_{ii}` on the diagonal).
  """
  m = lower.shape[0]
  inverse = jax.scipy.linalg.solve_triangular(lower, jnp.eye(m, dtype=lower.dtype), lower=True)
  first = inverse / jnp.linalg.norm(inverse, axis=0)
  second = _second_directions(first)
  rows = lower.T  # column i: L^T e_i
  residual = (
    jnp.sum(first * rows, axis=0)[:, None] ** 2 + jnp.einsum('kij,ki->ij', second, rows) ** 2
  )
  return first, second, residual
