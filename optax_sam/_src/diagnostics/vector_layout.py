"""How the estimators hold vectors like the parameters: leaf by leaf, or raveled into one.

Lanczos, stochastic Lanczos quadrature and the trace estimators keep vectors like
``params`` (a Krylov basis, probes, sketches) and do arithmetic on them: inner
products, Gram-Schmidt, scaling. Held as the parameter pytree (``'tree'``), each
such operation is one XLA kernel per leaf, and compiling them grows with the
number of leaves: on CPU the default ``hessian_eigenvalues`` first-called in
1.6 s on a 6-leaf MLP and 5 s on a 50-leaf one. Raveled into one vector
(``'flat'``), the arithmetic is one kernel whatever the leaves (1.1 s and 2 s;
``benchmarks/curvature_first_call.py``). The product ``matvec`` still receives
and returns vectors like ``params`` (cut out of the raveled vector before,
raveled after), so the parameters themselves are neither copied nor flattened.

A raveled vector joins leaves that may be sharded differently, and would gather
a parameter sharded over a model axis on every device. ``'auto'`` therefore
ravels only parameters it can see whole: concrete arrays of one dtype, each on
one device or replicated. Inside ``jax.jit`` their shardings are not known, so
``'auto'`` keeps the pytree there; pass ``layout='flat'`` for parameters known
to be unsharded.

Raveling costs memory and later calls on large models: XLA copies the raveled
Lanczos basis once per step, so the Lanczos estimators hold two bases instead of
one (``hessian_eigenvalues`` on a 105,610-parameter MLP: 54 parameter copies of
temporaries raveled, 34 leaf by leaf; SLQ 75 and 46), and on that MLP later SLQ
calls took 239 ms raveled against 173 ms. What raveling saves, compile time, does
not grow with the parameters. So ``'auto'`` ravels only up to
:data:`AUTO_FLAT_MAX_PARAMS` parameters (the second basis is then at most
``num_steps + 1`` times 4 MiB in float32).
"""

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ('auto', 'tree', 'flat')
AUTO_FLAT_MAX_PARAMS = 2**20  # 'auto' keeps larger parameters leaf by leaf (see above)


def resolve(layout: str, params: Any) -> str:
  """``'tree'`` or ``'flat'``: ``layout`` itself, or what ``'auto'`` chooses for ``params``.

  Args:
    layout: ``'auto'``, ``'tree'`` or ``'flat'``.
    params: the parameters (or a template of the vectors).

  Returns:
    ``'flat'`` for ``'auto'`` when every leaf of ``params`` is a concrete array,
    on one device or replicated, all leaves share one dtype and they hold at
    most :data:`AUTO_FLAT_MAX_PARAMS` entries; ``'tree'`` for ``'auto'``
    otherwise (a traced leaf, a leaf split across devices, mixed dtypes, more
    parameters); ``'tree'`` for ``params`` without leaves, whatever ``layout``.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}.')
  leaves = jax.tree.leaves(params)
  if not leaves:
    return 'tree'  # nothing to ravel; the estimator reports the empty parameters
  if layout != 'auto':
    return layout
  one_dtype = len({jnp.result_type(leaf) for leaf in leaves}) == 1
  small = num_params(params) <= AUTO_FLAT_MAX_PARAMS
  return 'flat' if one_dtype and small and all(map(_whole, leaves)) else 'tree'


def num_params(tree: Any) -> int:
  """The number of scalar entries of ``tree`` (static)."""
  return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def _whole(leaf: Any) -> bool:
  """Whether ``leaf`` is a concrete array that every device holding it holds whole."""
  if isinstance(leaf, np.ndarray):
    return True
  if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
    return False
  return leaf.sharding.is_fully_replicated


def unraveler(tree: Any) -> Callable[[jax.Array], Any]:
  """The map from a vector of ``tree``'s size to a tree like ``tree`` (its shapes and dtypes).

  The leaves are cut out in ``jax.tree.leaves`` order, the order :func:`ravel` joins them in.
  """
  leaves, treedef = jax.tree.flatten(tree)
  pieces = [
    (offset, jnp.shape(leaf), jnp.result_type(leaf))
    for offset, leaf in zip(offsets(tree), leaves, strict=True)
  ]

  def unravel(flat: jax.Array) -> Any:
    out = [
      jax.lax.slice_in_dim(flat, offset, offset + math.prod(shape)).reshape(shape).astype(dtype)
      for offset, shape, dtype in pieces
    ]
    return jax.tree.unflatten(treedef, out)

  return unravel


def offsets(tree: Any) -> list[int]:
  """Where each leaf of ``tree`` starts in the raveled vector (``jax.tree.leaves`` order)."""
  sizes = [math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree)]
  return [0, *itertools.accumulate(sizes)][: len(sizes)]


def ravel(tree: Any, dtype: Any) -> jax.Array:
  """The leaves of ``tree`` joined into one vector of ``dtype``."""
  return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in jax.tree.leaves(tree)])


def raveled(
  matvec: Callable[[Any], Any], params: Any
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array, Callable[[jax.Array], Any]]:
  """The operator ``matvec`` on raveled vectors.

  Args:
    matvec: ``matvec(v) -> Mv`` for ``v`` like ``params``.
    params: the template of the vectors, with at least one leaf.

  Returns:
    ``(flat_matvec, template, unravel)``: ``flat_matvec(x) = ravel(matvec(unravel(x)))``,
    ``template`` a zero vector of the raveled size and dtype (a template for the estimators,
    not a copy of ``params``), ``unravel`` the map back to vectors like ``params``.
  """
  dtype = jnp.result_type(*jax.tree.leaves(params))
  unravel = unraveler(params)
  template = jnp.zeros([num_params(params)], dtype)
  return (lambda x: ravel(matvec(unravel(x)), dtype)), template, unravel
