"""Two gradients that do not depend on each other, evaluated side by side.

A step whose two gradient points are both known before either gradient is
taken (SAMPa's perturbed and auxiliary points) need not run them one after
the other. :func:`evaluate` takes the pair by one of three routes:

- ``'vmap'`` (the default): one program, ``jax.vmap`` of ``grad_fn`` over the
  two points stacked on a new leading axis. On one device the two backward
  passes run as one batched program; give ``sharding`` (a sharding of the
  stacked pair, e.g. ``NamedSharding(mesh, P('pair'))`` over a 2-device mesh)
  and under ``jit`` each device computes one of them.
- ``'sequential'``: ``grad_fn`` twice, one after the other (half the
  activation memory; for a ``grad_fn`` that cannot be vmapped).
- ``axis_name``: inside ``shard_map``/``pmap`` over an axis of size 2, device
  ``i`` computes the gradient at point ``i`` and one all-reduce hands both
  gradients to both devices (SAM at one gradient's wall-clock on two devices).

``grad_fn`` is either ``grad_fn(params) -> grads`` (both points on the batch it
closes over) or a :class:`BatchPair`, which gives each point its own batch.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

ROUTES = ('vmap', 'sequential')


def _stack(first: Any, second: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.stack([a, b]), first, second)


class BatchPair(NamedTuple):
  """A gradient of ``(params, batch)`` and one batch per point; pass it as ``grad_fn``.

  Attributes:
    grad_fn: ``grad_fn(params, batch) -> grads``.
    batches: the two batches stacked on a new leading axis: the first point's
      batch, then the second's.
  """

  grad_fn: Callable[[optax.Params, Any], optax.Updates]
  batches: Any


def batch_pair(
  grad_fn: Callable[[optax.Params, Any], optax.Updates], first: Any, second: Any
) -> BatchPair:
  """Pairs ``grad_fn(params, batch)`` with the batch of each of the two points.

  Args:
    grad_fn: ``grad_fn(params, batch) -> grads``.
    first: the batch of the first point (for SAMPa: the perturbed point, whose
      batch is the one its ascent direction came from, i.e. the previous batch).
    second: the batch of the second point (for SAMPa: the current batch).

  Returns:
    A :class:`BatchPair` to pass as ``grad_fn``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_sam
    >>> loss = lambda w, b: jnp.mean((b * w) ** 2)
    >>> pair = optax_sam.batch_pair(jax.grad(loss), jnp.ones(3), 2 * jnp.ones(3))
    >>> pair.batches.shape
    (2, 3)
  """
  if not callable(grad_fn):
    raise TypeError(f'batch_pair needs grad_fn(params, batch) -> grads, got {grad_fn!r}.')
  shapes = [jax.tree.map(jnp.shape, b) for b in (first, second)]
  if jax.tree.structure(first) != jax.tree.structure(second) or shapes[0] != shapes[1]:
    raise ValueError(
      'batch_pair stacks the two batches, so they must have the same structure and shapes; '
      f'got {shapes[0]} and {shapes[1]}.'
    )
  return BatchPair(grad_fn, _stack(first, second))


GradFnOrPair = Union[Callable[[optax.Params], optax.Updates], BatchPair]


def _unstack(pair: Any) -> tuple[Any, Any]:
  return jax.tree.map(lambda x: x[0], pair), jax.tree.map(lambda x: x[1], pair)


def _explicit(sharding: jax.sharding.Sharding) -> bool:
  """Whether ``sharding`` is over a mesh with explicit axes (sharding in types)."""
  explicit = getattr(jax.sharding.AxisType, 'Explicit', None)
  axis_types = getattr(getattr(sharding, 'mesh', None), 'axis_types', ())
  return explicit is not None and explicit in axis_types


def _constrain(points: Any, sharding: jax.sharding.Sharding) -> Any:
  """``points`` laid out by ``sharding``: ``reshard`` on a mesh with explicit axes, else a hint."""
  if _explicit(sharding):
    return jax.sharding.reshard(points, sharding)
  return jax.lax.with_sharding_constraint(points, sharding)


def _one(grad_fn: GradFnOrPair, params: Any, index: Any) -> Any:
  """The gradient at ``params`` with point ``index``'s batch (a traced index is fine)."""
  if isinstance(grad_fn, BatchPair):
    batch = jax.tree.map(lambda b: b[index], grad_fn.batches)
    return grad_fn.grad_fn(params, batch)
  return grad_fn(params)


def evaluate(
  grad_fn: GradFnOrPair,
  first: Any,
  second: Any,
  *,
  route: str = 'vmap',
  axis_name: Optional[str] = None,
  sharding: Optional[jax.sharding.Sharding] = None,
) -> tuple[Any, Any]:
  """The gradients at ``first`` and at ``second`` (see the module for the routes).

  Args:
    grad_fn: ``grad_fn(params) -> grads`` or a :class:`BatchPair`.
    first: the first point.
    second: the second point (the structure and dtypes of ``first``).
    route: ``'vmap'`` or ``'sequential'`` (without ``axis_name``).
    axis_name: a mapped axis of size 2 that splits the pair (one point per device).
    sharding: with ``'vmap'``, the sharding of the stacked pair.

  Returns:
    ``(grad_fn(first), grad_fn(second))``.
  """
  if axis_name is not None:
    size = jax.lax.psum(1, axis_name)
    if size != 2:
      raise ValueError(
        f'the pair axis {axis_name!r} must have size 2 (one point per device), got {size}.'
      )
    index = jax.lax.axis_index(axis_name)
    point = optax.tree.where(index == 0, first, second)
    g = _one(grad_fn, point, index)
    zeros = optax.tree.zeros_like(g)
    mine = (optax.tree.where(index == 0, g, zeros), optax.tree.where(index == 1, g, zeros))
    return jax.lax.psum(mine, axis_name)
  if route == 'sequential':
    return _one(grad_fn, first, 0), _one(grad_fn, second, 1)
  points = _stack(first, second)
  if sharding is not None:
    points = _constrain(points, sharding)
  if isinstance(grad_fn, BatchPair):
    grads = jax.vmap(grad_fn.grad_fn)(points, grad_fn.batches)
  else:
    grads = jax.vmap(grad_fn)(points)
  if sharding is not None and _explicit(sharding):  # both gradients on every device
    grads = jax.sharding.reshard(grads, jax.sharding.NamedSharding(sharding.mesh, P()))
  return _unstack(grads)
