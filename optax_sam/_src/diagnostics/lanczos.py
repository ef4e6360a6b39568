r"""The Lanczos process on a parameter pytree, with full reorthogonalization.

Starting from a unit vector :math:`v_0`, ``m`` steps build an orthonormal
basis :math:`V = [v_0, \dots, v_{m-1}]` of the Krylov space
:math:`\mathrm{span}\{v_0, H v_0, \dots, H^{m-1} v_0\}` and the tridiagonal
:math:`T = V^\top H V`:

.. math::

  w = H v_j - \alpha_j v_j - \beta_{j-1} v_{j-1}, \quad
  \alpha_j = \langle v_j, H v_j \rangle, \quad
  \beta_j = \|w\|, \quad v_{j+1} = w / \beta_j,

where ``w`` is additionally orthogonalized against every stored vector, twice
(full reorthogonalization), so the basis stays orthonormal to working
precision and no spurious copies of converged eigenvalues appear.

*Breakdown.* When :math:`\beta_j` falls below ``rtol`` times the largest
:math:`\|H v_i\|` seen, the Krylov space is invariant: the eigenvalues of the
leading block of :math:`T` are exact eigenvalues of :math:`H`. The process
then restarts from a random vector orthogonal to the basis and sets
:math:`\beta_j = 0`, so :math:`T` is block diagonal and every block holds
exact Ritz values of :math:`H`. When no orthogonal direction is left (a model
with fewer parameters than steps), the remaining steps are marked invalid:
their vectors are zero and :func:`tridiagonal_eigh` moves their rows out of
the spectrum instead of reporting zeros.

References:
  Lanczos, 1950, "An iteration method for the solution of the eigenvalue
  problem of linear differential and integral operators", J. Res. Nat. Bur.
  Standards 45; Golub and Van Loan, "Matrix Computations", 4th ed., section
  10.1 (reorthogonalization).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_sam._src import numerics
from optax_sam._src.diagnostics import hvp as hvp_lib
from optax_sam._src.diagnostics import tree_basis


class LanczosResult(NamedTuple):
  """Output of :func:`lanczos`.

  Attributes:
    alphas: ``[m]`` diagonal of :math:`T` (0 on invalid steps).
    betas: ``[m - 1]`` off-diagonal of :math:`T` (0 at breakdowns).
    basis: the vectors :math:`v_j`, leaves ``[m, *leaf.shape]`` (zero on
      invalid steps).
    valid: ``[m]`` bool, whether :math:`v_j` is a basis vector.
    last_beta: :math:`\beta_{m-1} = \\|w\\|` after the last step, which couples
      :math:`T` to the next (not built) vector: the residual of a Ritz pair
      :math:`(\theta_i, V s_i)` is :math:`|\beta_{m-1} s_{m-1, i}|` (0 when the
      Krylov space is exhausted).
  """

  alphas: jax.Array
  betas: jax.Array
  basis: Any
  valid: jax.Array
  last_beta: jax.Array


def default_rtol(dtype: Any) -> float:
  """Relative breakdown tolerance: ``eps ** 0.75`` of ``dtype`` (6.6e-6 in float32)."""
  return float(jnp.finfo(dtype).eps) ** 0.75


def lanczos(
  matvec: Callable[[Any], Any],
  v0: Any,
  num_steps: int,
  key: jax.Array,
  rtol: float | None = None,
  unroll: bool = False,
) -> LanczosResult:
  """Runs ``num_steps`` Lanczos steps of ``matvec`` from ``v0`` (normalized here).

  Costs ``num_steps`` products and stores ``num_steps + 1`` vectors like
  ``v0``. ``key`` draws the restart vectors after a breakdown. ``unroll``
  unrolls the loop (see :func:`optax_sam.sharpness.hessian_eigenvalues`).
  """
  dtype = numerics.accumulation_dtype(v0)
  rtol = default_rtol(dtype) if rtol is None else rtol
  m = num_steps
  norm0 = tree_basis.norm(v0)
  v0 = numerics.scale_tree(v0, numerics.safe_ratio(jnp.ones([], dtype), norm0))
  basis = tree_basis.put(tree_basis.zeros(v0, m + 1), 0, v0)
  init = (
    basis,
    jnp.zeros([m], dtype),  # alphas
    jnp.zeros([m], dtype),  # betas (the last one couples to v_m, not kept)
    jnp.zeros([m + 1], bool).at[0].set(norm0 > 0),  # valid
    jnp.zeros([], dtype),  # largest ||H v|| so far
  )

  def step(j, carry):
    basis, alphas, betas, valid, hnorm = carry
    v = tree_basis.get(basis, j)
    hv = matvec(v)
    hnorm = jnp.maximum(hnorm, tree_basis.norm(hv))
    alpha = numerics.vdot(v, hv)

    # Round 0 orthogonalizes H v_j (removing alpha v_j, beta v_{j-1} and roundoff). After a
    # breakdown, round 1 orthogonalizes a random restart vector instead. The rounds share one
    # projection in the compiled loop (a branch holding a second one cost about a sixth of the
    # first call's time, docs/sharpness.md), and a step without breakdown runs round 0 alone.
    def round_(state):
      x, count, _, _ = state
      x = jax.lax.cond(
        count == 0,
        lambda: x,
        lambda: jax.tree.map(
          lambda r, h: r.astype(h.dtype),
          hvp_lib.random_like(jax.random.fold_in(key, j), v, 'rademacher'),
          x,
        ),
      )
      before = tree_basis.norm(x)
      x = tree_basis.project_out(basis, x)
      return x, count + 1, before, tree_basis.norm(x)

    def again(state):
      _, count, _, after = state
      return (count == 0) | ((count == 1) & (after <= rtol * hnorm))

    zero = jnp.zeros([], dtype)
    x, count, before, after = jax.lax.while_loop(again, round_, (hv, jnp.int32(0), zero, zero))
    broke = count == 2
    fresh = valid[j] & (after > jnp.sqrt(rtol) * before)
    # after > 0 but for a restart with nothing fresh left, whose vector is zero (an invalid step).
    scale = jnp.where(broke & ~fresh, 0, 1 / jnp.where(after > 0, after, 1))
    v_next = numerics.scale_tree(x, scale)
    beta = jnp.where(broke, 0, after)
    valid_next = jnp.where(broke, fresh, valid[j])
    alphas = alphas.at[j].set(jnp.where(valid[j], alpha, 0))
    betas = betas.at[j].set(jnp.where(valid[j], beta, 0))
    return (
      tree_basis.put(basis, j + 1, v_next),
      alphas,
      betas,
      valid.at[j + 1].set(valid_next),
      hnorm,
    )

  basis, alphas, betas, valid, _ = jax.lax.fori_loop(0, m, step, init, unroll=unroll or None)
  basis = jax.tree.map(lambda b: b[:m], basis)
  return LanczosResult(
    alphas=alphas, betas=betas[: m - 1], basis=basis, valid=valid[:m], last_beta=betas[m - 1]
  )


def tridiagonal_eigh(
  alphas: jax.Array, betas: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eigenvalues (ascending) and eigenvectors of the valid part of a Lanczos tridiagonal.

  Rows of invalid steps get a diagonal entry below the Gershgorin interval of
  the valid rows, so their eigenpairs are the lowest, supported on invalid
  rows only, and never mix with the valid ones.

  Returns:
    ``(values, vectors, ok)``: ``values`` ``[m]`` ascending (0 where not
    ``ok``), ``vectors`` ``[m, m]`` with eigenvectors as columns, ``ok``
    ``[m]`` whether the pair belongs to the valid part.
  """
  m = alphas.shape[0]
  upper = jnp.concatenate([betas, jnp.zeros([1], betas.dtype)])
  lower = jnp.concatenate([jnp.zeros([1], betas.dtype), betas])
  radius = jnp.abs(upper) + jnp.abs(lower)
  big = jnp.finfo(alphas.dtype).max
  low = jnp.min(jnp.where(valid, alphas - radius, big))
  high = jnp.max(jnp.where(valid, alphas + radius, -big))
  low, high = jnp.where(jnp.any(valid), low, 0), jnp.where(jnp.any(valid), high, 0)
  sentinel = low - (high - low) - 1
  diag = jnp.where(valid, alphas, sentinel)
  t = jnp.diag(diag) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
  values, vectors = jnp.linalg.eigh(t)
  ok = jnp.sum(jnp.where(valid[:, None], vectors**2, 0), axis=0) > 0.5
  del m
  return jnp.where(ok, values, 0), vectors, ok
