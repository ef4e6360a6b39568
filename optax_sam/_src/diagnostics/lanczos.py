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
exact Ritz values of :math:`H`. The restart vectors come from a counter-based
hash of the key, the step and each entry's index (:func:`hashed_uniform_like`),
not from ``jax.random``: each ``jax.random`` draw compiles to a loop of its own,
and the two inside the Lanczos loop (a ``fold_in`` and the draw) cost 0.05-0.1 s
of a 1 s first call (docs/sharpness.md). When no orthogonal direction is left
(a model with fewer parameters than steps), the remaining steps are marked invalid:
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
import numpy as np

from optax_sam._src import numerics
from optax_sam._src.diagnostics import tree_basis, vector_layout


class LanczosResult(NamedTuple):
  """Output of :func:`lanczos`.

  Attributes:
    alphas: ``[m]`` diagonal of :math:`T` (0 on invalid steps).
    betas: ``[m - 1]`` off-diagonal of :math:`T` (0 at breakdowns).
    basis: the vectors :math:`v_0, \\dots, v_m`, leaves ``[m + 1, *leaf.shape]``
      (zero on invalid steps). The last, :math:`v_m`, is the next vector, outside
      :math:`T` (the direction of every Ritz residual, or a restart vector when
      ``last_beta`` is 0), kept rather than sliced off (a slice is one more
      kernel to compile).
    valid: ``[m]`` bool, whether :math:`v_j` is a basis vector.
    last_beta: :math:`\beta_{m-1} = \\|w\\|` after the last step, which couples
      :math:`T` to :math:`v_m`: the residual of a Ritz pair
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
  seed: jax.Array,
  rtol: float | None = None,
  unroll: bool = False,
) -> LanczosResult:
  """Runs ``num_steps`` Lanczos steps of ``matvec`` from ``v0`` (normalized here).

  Costs ``num_steps`` products and stores ``num_steps + 1`` vectors like
  ``v0``. ``seed`` (:func:`seed_of` a key, which may also have hashed ``v0``
  with counter :data:`START`) seeds the restart vectors after a breakdown
  (:func:`hashed_uniform_like`). ``unroll`` unrolls the loop (see
  :func:`optax_sam.sharpness.hessian_eigenvalues`).
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
    alpha = numerics.vdot(v, hv)

    # Round 0 orthogonalizes H v_j (removing alpha v_j, beta v_{j-1} and roundoff). After a
    # breakdown, round 1 orthogonalizes a random restart vector instead. The rounds share one
    # projection in the compiled loop (a branch holding a second one cost about a sixth of the
    # first call's time, docs/sharpness.md), and a step without breakdown runs round 0 alone.
    def round_(state):
      x, count, _, _, hnorm = state
      x = jax.lax.cond(count == 0, lambda: x, lambda: hashed_uniform_like(seed, j, x))
      before = tree_basis.norm(x)
      hnorm = jnp.where(count == 0, jnp.maximum(hnorm, before), hnorm)  # ||H v_j|| joins in
      x = tree_basis.project_out(basis, x)
      return x, count + 1, before, tree_basis.norm(x), hnorm

    def again(state):
      _, count, _, after, hnorm = state
      return (count == 0) | ((count == 1) & (after <= rtol * hnorm))

    zero = jnp.zeros([], dtype)
    state = (hv, jnp.int32(0), zero, zero, hnorm)
    x, count, before, after, hnorm = jax.lax.while_loop(again, round_, state)
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
  return LanczosResult(
    alphas=alphas, betas=betas[: m - 1], basis=basis, valid=valid[:m], last_beta=betas[m - 1]
  )


def _mix(x: jax.Array) -> jax.Array:
  """A bijective avalanche hash of ``uint32`` entries (C. Wellons' "lowbias32")."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def seed_of(key: jax.Array, counter: Any = 0) -> jax.Array:
  """A ``uint32`` seed hashed from the bits of ``key`` (typed or raw) and an integer ``counter``."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  seed = _mix(jnp.asarray(counter).astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9))
  for word in jnp.ravel(data).astype(jnp.uint32):
    seed = _mix(seed ^ word)
  return seed


# The counter of the start vector: the restarts use the steps 0, 1, ..., so it is the last uint32.
START = np.uint32(2**32 - 1)


def hashed_uniform_like(seed: jax.Array, counter: jax.Array, tree: Any) -> Any:
  """Entries uniform in ``[-1, 1)`` like ``tree``, hashed from ``seed``, ``counter`` and the index.

  Entry ``i`` of the raveled tree (its leaves in ``jax.tree`` order, each in row-major order) is
  ``_mix(_mix(i) ^ s)`` with ``s`` hashed from ``(seed, counter)``, its top 24 bits scaled to
  ``[-1, 1)`` (then rounded to the leaf's dtype). So a tree and its raveled vector get the same
  entries, and both layouts of the diagnostics start from the same vector. Elementwise on an
  iota, it compiles to one fused kernel per leaf, needs no stored random vector, and keeps a
  sharded leaf sharded. Different counters give (pseudo-)independent vectors in general
  position, which is what Lanczos needs of its start (counter :data:`START`) and of its
  restarts (the step); the trace estimators' probes use ``jax.random``, drawn once up front.
  The index is a ``uint32``: beyond 2^32 parameters the entries repeat.
  """
  base = _mix(seed ^ _mix(jnp.asarray(counter).astype(jnp.uint32) + jnp.uint32(0x632BE5AB)))

  def one(offset, leaf):
    shape = jnp.shape(leaf)
    flat = jnp.full(shape, offset % 2**32, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
      flat = flat + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
      stride *= shape[axis]
    bits = _mix(_mix(flat) ^ base)
    uniform = (bits >> 8).astype(jnp.float32) * 2.0**-23 - 1  # exact in float32
    return uniform.astype(jnp.result_type(leaf))

  leaves, treedef = jax.tree.flatten(tree)
  starts = vector_layout.offsets(tree)
  return jax.tree.unflatten(treedef, [one(o, x) for o, x in zip(starts, leaves, strict=True)])


def tridiagonal_eigh(
  alphas: jax.Array, betas: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eigenvalues (ascending) and eigenvectors of the valid part of a Lanczos tridiagonal.

  Every invalid row is its own 1 x 1 block (its couplings are 0). It gets the
  diagonal entry ``-2 b - 1``, with ``b = max |alpha| + 2 max |beta|`` over the
  valid part, a bound on its spectral radius (Gershgorin): so the invalid
  eigenvalues are the lowest, at least ``b + 1`` below every valid one, and
  their eigenvectors never mix with the valid ones.

  Returns:
    ``(values, vectors, ok)``: ``values`` ``[m]`` ascending (0 where not
    ``ok``), ``vectors`` ``[m, m]`` with eigenvectors as columns, ``ok``
    ``[m]`` whether the pair belongs to the valid part.
  """
  m = alphas.shape[0]
  couplings = jnp.concatenate([betas, jnp.zeros([1], betas.dtype)])  # row i to row i + 1
  bound = jnp.max(jnp.where(valid, jnp.abs(alphas), 0)) + 2 * jnp.max(jnp.abs(couplings))
  diagonal = jnp.where(valid, alphas, -2 * bound - 1)
  row = jax.lax.broadcasted_iota(jnp.int32, (m, m), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (m, m), 1)
  t = jnp.where(row == col, diagonal[:, None], 0)
  t = t + jnp.where(col == row + 1, couplings[:, None], 0) + jnp.where(row == col + 1, couplings, 0)
  values, vectors = jnp.linalg.eigh(t)
  ok = values > -1.5 * bound - 0.5  # halfway between the valid part's bound and the invalid rows
  return jnp.where(ok, values, 0), vectors, ok
