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

and the estimate is their mean. Each :math:`\hat t_i` is unbiased, so their
spread gives the error estimate: the standard error of the :math:`m`
leave-one-out estimates. All :math:`m` of them come from one sketch,
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
from optax_sam._src.diagnostics import tree_basis


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


def sketch(matvec: Callable[[Any], Any], params: Any, key: jax.Array, m: int) -> Sketch:
  """The :class:`Sketch` of ``m`` Rademacher probes: ``2 m`` products, ``4 m`` stored vectors."""
  omega = probes(key, params, m)
  y = jax.lax.map(matvec, omega)
  q, kept = tree_basis.orthonormalize(y, lanczos_lib.default_rtol(numerics.accumulation_dtype(y)))
  z = jax.lax.map(matvec, q)
  r = tree_basis.gram(q, y)
  # R is upper triangular with a zero row where Q has none; a 1 there keeps the inverse finite.
  columns = jnp.linalg.inv(r + jnp.diag((~kept).astype(r.dtype))).T
  s = columns / jnp.linalg.norm(columns, axis=0) * jnp.all(kept)
  return Sketch(
    omega=omega,
    y=y,
    q=q,
    z=z,
    r=r,
    s=s,
    w=tree_basis.gram(q, omega),
    h=tree_basis.gram(q, z),
    t=tree_basis.gram(z, omega),
    oy=jnp.diag(tree_basis.gram(omega, y)),
  )


def xtrace_samples(sk: Sketch) -> jax.Array:
  r"""The ``m`` leave-one-out trace estimates :math:`\hat t_i` of XTrace.

  With :math:`c_i = w_i - s_i (s_i^\top w_i)` the coordinates in :math:`Q` of
  the part of :math:`\omega_i` that :math:`Q_{(i)}` captures,

  .. math::

    \hat t_i = \operatorname{tr} H - s_i^\top H s_i + \omega_i^\top y_i
    - c_i^\top (r_i + t_i) + c_i^\top H c_i.
  """
  c = sk.w - sk.s * jnp.sum(sk.s * sk.w, axis=0)
  return (
    jnp.trace(sk.h)
    - jnp.sum(sk.s * (sk.h @ sk.s), axis=0)
    + sk.oy
    - jnp.sum(c * (sk.r + sk.t), axis=0)
    + jnp.sum(c * (sk.h @ c), axis=0)
  )


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


def xnystrace_samples(
  matvec: Callable[[Any], Any], params: Any, key: jax.Array, m: int
) -> jax.Array:
  r"""The ``m`` leave-one-out estimates of XNysTrace, for a positive semi-definite :math:`A`.

  The Nystrom approximation :math:`\hat A = Y (\Omega^\top Y)^{-1} Y^\top`
  of the ``m`` probes, and :math:`\hat A_{(i)}` of all but probe :math:`i`:
  with :math:`\Omega^\top Y = L L^\top`, :math:`Y = QR`,
  :math:`B = R L^{-\top}` (so :math:`\hat A = Q B B^\top Q^\top`) and
  :math:`x_i = L^{-1} e_i`, removing probe :math:`i` downdates
  :math:`(\Omega^\top Y)^{-1}` by a rank-one term, and

  .. math::

    \hat t_i = \operatorname{tr} \hat A_{(i)} + \omega_i^\top (A - \hat A_{(i)}) \omega_i
    = \|B\|_F^2 - \frac{\|B x_i\|^2}{\|x_i\|^2} + \frac{1}{\|x_i\|^2}.

  As in the paper, :math:`A + \nu I` is sketched and :math:`\nu n`
  subtracted, which keeps the Cholesky factor finite for low-rank :math:`A`;
  here :math:`\nu = 10 m \epsilon \|Y\|_F / \sqrt n`, 10 m times the
  paper's, above Cholesky's backward error in float32 too. Costs ``m``
  products, stores ``3 m`` vectors.
  """
  omega = probes(key, params, m)
  y = jax.lax.map(matvec, omega)
  n = hvp_lib.num_params(params)
  scale = jnp.sqrt(numerics.vdot(y, y) / n)
  nu = 10 * m * jnp.finfo(scale.dtype).eps * jnp.where(scale > 0, scale, 1)
  y = jax.tree.map(lambda a, b: a + (nu * b).astype(a.dtype), y, omega)
  q, _ = tree_basis.orthonormalize(y, 0.0)
  h = tree_basis.gram(omega, y)
  lower = jnp.linalg.cholesky(0.5 * (h + h.T))
  b = jax.scipy.linalg.solve_triangular(lower, tree_basis.gram(q, y).T, lower=True).T
  x = jax.scipy.linalg.solve_triangular(lower, jnp.eye(m, dtype=h.dtype), lower=True)
  d = jnp.sum(x**2, axis=0)
  samples = jnp.sum(b**2) - jnp.sum((b @ x) ** 2, axis=0) / d + 1 / d - nu * n
  return jnp.where(scale > 0, samples, 0)  # A Omega = 0: A = 0 (almost surely)
