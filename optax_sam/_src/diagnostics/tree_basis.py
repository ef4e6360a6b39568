"""Sets of parameter-shaped vectors stored as one pytree whose leaves have a leading axis.

A *basis* of ``m`` vectors like ``params`` is the pytree of ``params`` with
each leaf stacked to shape ``[m, *leaf.shape]``. Coefficients and inner
products are computed leaf by leaf and summed over leaves, so a vector sharded
over a model axis stays sharded, in float32 or wider
(:func:`numerics.accumulation_dtype`). A raveled vector (``vector_layout``) is
the one-leaf case.
"""

from typing import Any

import jax
import jax.numpy as jnp

from optax_sam._src import numerics


def zeros(tree: Any, m: int) -> Any:
  """A basis of ``m`` zero vectors like ``tree``."""
  return jax.tree.map(lambda x: jnp.zeros((m, *jnp.shape(x)), jnp.result_type(x)), tree)


def get(basis: Any, i: Any) -> Any:
  """Vector ``i`` of ``basis`` (``i`` may be traced)."""
  return jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, i, 0, keepdims=False), basis)


def put(basis: Any, i: Any, vector: Any) -> Any:
  """``basis`` with vector ``i`` replaced by ``vector`` (``i`` may be traced).

  A select over the leading axis rather than a dynamic update slice: it
  costs a pass over the basis (as the reorthogonalization does anyway) and
  accepts any sharding of ``vector`` under explicitly sharded ``jit``.
  """

  def one(b, v):
    rows = jax.lax.broadcasted_iota(jnp.int32, (b.shape[0],) + (1,) * v.ndim, 0)
    return jnp.where(rows == i, v.astype(b.dtype)[None], b)

  return jax.tree.map(one, basis, vector)


def coefficients(basis: Any, vector: Any) -> jax.Array:
  """The inner products ``[<b_0, v>, ..., <b_{m-1}, v>]``, shape ``[m]``."""
  dtype = numerics.accumulation_dtype(vector)
  parts = [
    jnp.tensordot(b.astype(dtype), v.astype(dtype), axes=v.ndim)
    for b, v in zip(jax.tree.leaves(basis), jax.tree.leaves(vector), strict=True)
  ]
  return sum(parts[1:], parts[0])


def combine(basis: Any, coeffs: jax.Array) -> Any:
  """``sum_i coeffs[i] * b_i``, a vector like one of the basis's.

  ``coeffs`` ``[m]``, or ``[k, m]`` for ``k`` combinations (leaves ``[k, *leaf.shape]``).
  """
  return jax.tree.map(
    lambda b: jnp.tensordot(
      coeffs.astype(jnp.promote_types(coeffs.dtype, b.dtype)), b, axes=1
    ).astype(b.dtype),
    basis,
  )


def gram(basis_a: Any, basis_b: Any) -> jax.Array:
  """The matrix of inner products ``<a_i, b_j>``, shape ``[m_a, m_b]``."""
  dtype = numerics.accumulation_dtype((basis_a, basis_b))
  parts = [
    jnp.tensordot(
      a.astype(dtype), b.astype(dtype), axes=(tuple(range(1, a.ndim)), tuple(range(1, b.ndim)))
    )
    for a, b in zip(jax.tree.leaves(basis_a), jax.tree.leaves(basis_b), strict=True)
  ]
  return sum(parts[1:], parts[0])


def row_dots(basis_a: Any, basis_b: Any) -> jax.Array:
  """The inner products ``<a_i, b_i>`` of matching rows, shape ``[m]`` (the diagonal of gram)."""
  dtype = numerics.accumulation_dtype((basis_a, basis_b))
  parts = [
    jnp.sum(a.astype(dtype) * b.astype(dtype), axis=tuple(range(1, a.ndim)))
    for a, b in zip(jax.tree.leaves(basis_a), jax.tree.leaves(basis_b), strict=True)
  ]
  return sum(parts[1:], parts[0])


def project_out(basis: Any, vector: Any, passes: int = 2) -> Any:
  """``vector`` minus its projection on the span of orthonormal (or zero) basis vectors.

  Classical Gram-Schmidt repeated ``passes`` times ("twice is enough",
  Giraud et al. 2005), which keeps the result orthogonal to working precision.
  Zero rows of ``basis`` (slots not filled yet) have no effect.
  """
  for _ in range(passes):
    c = coefficients(basis, vector)
    vector = jax.tree.map(lambda v, p: v - p.astype(v.dtype), vector, combine(basis, c))
  return vector


def orthonormalize(basis: Any, rtol: float) -> tuple[Any, jax.Array]:
  """An orthonormal basis of the span of ``basis``'s vectors (Gram-Schmidt, two passes).

  Vector ``i`` is orthogonalized against the ones kept before it; when what
  is left is at most ``rtol`` times its original norm (it lies in their span
  to working precision), it is replaced by zero, so the rank is revealed
  without NaN.

  Returns:
    ``(q, kept)``: ``q`` has the layout of ``basis``, orthonormal nonzero
    rows; ``kept`` ``[m]`` bool says which rows are nonzero.
  """
  m = jax.tree.leaves(basis)[0].shape[0]
  q = jax.tree.map(jnp.zeros_like, basis)
  kept = jnp.zeros([m], bool)

  def body(i, carry):
    q, kept = carry
    v = get(basis, i)
    before = norm(v)
    v = project_out(q, v)
    after = norm(v)
    keep = after > rtol * before
    scale = jnp.where(keep, 1 / jnp.where(keep, after, 1), 0)
    return put(q, i, numerics.scale_tree(v, scale)), kept.at[i].set(keep)

  return jax.lax.fori_loop(0, m, body, (q, kept))


def norm(vector: Any) -> jax.Array:
  """The global L2 norm of one vector, in :func:`numerics.accumulation_dtype`.

  A plain square root of the sum of squares: the vectors of these algorithms
  are unit vectors and Hessian-vector products of them, far from overflow, so
  the overflow-safe :func:`numerics.global_norm` (a ``lax.cond`` per call, a
  large share of the compiled loop) is not needed.
  """
  return jnp.sqrt(numerics.vdot(vector, vector))
