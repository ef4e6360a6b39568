"""Reductions over parameter trees, in float32 or wider, that never divide by zero."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def accumulation_dtype(tree: Any) -> jnp.dtype:
  """The dtype norms and dot products of ``tree`` are computed in.

  float32, or the widest floating dtype among the leaves when that is wider
  (float64 parameters get float64 norms).
  """
  dtypes = [jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)]
  return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes)) if dtypes else jnp.float32


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves of ``tree``, computed in :func:`accumulation_dtype`.

  Finite leaves give a finite norm: when the sum of squares overflows (entries
  above about 1e19 in float32), the norm is recomputed from the leaves divided
  by their largest magnitude. That path runs only on overflow (``lax.cond``).
  """
  dtype = accumulation_dtype(tree)
  if not jax.tree.leaves(tree):
    return jnp.zeros([], dtype)
  tree = optax.tree.cast(tree, dtype)
  squared = optax.tree.norm(tree, squared=True)

  def rescaled(tree):
    scale = optax.tree.max(jax.tree.map(jnp.abs, tree))
    return scale * optax.tree.norm(optax.tree.scale(1 / scale, tree))

  return jax.lax.cond(jnp.isinf(squared), rescaled, lambda _: jnp.sqrt(squared), tree)


def vdot(tree_x: Any, tree_y: Any) -> jax.Array:
  """Inner product of two trees over all leaves, in :func:`accumulation_dtype`."""
  dtype = accumulation_dtype((tree_x, tree_y))
  if not jax.tree.leaves(tree_x):
    return jnp.zeros([], dtype)
  # Elementwise products summed leaf by leaf (not optax.tree.vdot, which flattens each
  # leaf and so gathers parameters sharded over a model axis).
  products = optax.tree.mul(optax.tree.cast(tree_x, dtype), optax.tree.cast(tree_y, dtype))
  return optax.tree.sum(products)


def safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """``numerator / denominator``, and 0 where the denominator is 0.

  Both branches are selected with ``jnp.where``, so a zero denominator never
  produces NaN or inf, also in the branch that is not taken.
  """
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def scale_tree(tree: Any, scale: jax.Array) -> Any:
  """Multiplies every leaf by a scalar computed in float32 or wider, keeping leaf dtypes."""
  return jax.tree.map(lambda x: (x * scale).astype(jnp.result_type(x)), tree)


def is_concrete(value: Any) -> bool:
  """Whether ``value`` is a Python or NumPy number or a concrete (untraced) array."""
  if isinstance(value, jax.core.Tracer):
    return False
  try:
    np.asarray(value, dtype=float)
  except (TypeError, ValueError):
    return False
  return True


def _allowed(low: float, high: float) -> str:
  if low == -float('inf') and high == float('inf'):
    return 'finite'
  return f'>= {low}' if high == float('inf') else f'in [{low}, {high}]'


def check_range(name: str, value: Any, low: float = 0.0, high: float = float('inf')) -> None:
  """Checks that a hyperparameter is a finite real number in ``[low, high]``.

  A real number is a Python ``int`` or ``float``, or a NumPy or JAX scalar of
  a numeric dtype; not a string and not a ``bool``. Traced values (as passed by
  ``optax.inject_hyperparams`` inside ``update``) and schedules (callables)
  cannot be checked here and are the caller's responsibility.

  Raises:
    ValueError: naming ``name``, the value received and what is allowed.
  """
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  allowed = f'{_allowed(low, high)} (a finite real number)'
  numeric = not isinstance(value, (str, bytes, bool, np.bool_)) and is_concrete(value)
  array = np.asarray(value) if numeric else None
  if array is None or array.dtype.kind not in 'iuf':
    raise ValueError(f'{name} must be {allowed}, got {value!r}.')
  if array.shape != ():
    raise ValueError(f'{name} must be a scalar, got {value!r} of shape {array.shape}.')
  number = float(array)
  if not (math.isfinite(number) and low <= number <= high):
    raise ValueError(f'{name} must be {allowed}, got {number}.')


def check_integer(name: str, value: Any, low: int = 1) -> int:
  """Checks that ``value`` is an integer (Python or NumPy, not a ``bool``) ``>= low``.

  Returns:
    The value as a Python ``int``.

  Raises:
    ValueError: naming ``name``, the value received and what is allowed.
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{name} must be an integer >= {low}, got {value!r}.')
  if value < low:
    raise ValueError(f'{name} must be an integer >= {low}, got {value}.')
  return int(value)


def check_flag(name: str, value: Any) -> bool:
  """Checks that an option is a ``bool`` (Python or NumPy) and returns it as a Python bool.

  Raises:
    TypeError: naming ``name`` and the value received.
  """
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name} must be True or False, got {value!r}.')
  return bool(value)
