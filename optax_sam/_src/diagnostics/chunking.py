"""Means over a batch evaluated chunk by chunk, so that memory does not grow with the batch."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import cpu_convolutions, numerics


def check_num_chunks(num_chunks: int) -> None:
  """Raises ``ValueError`` unless ``num_chunks`` is an integer ``>= 1``."""
  numerics.check_integer('num_chunks', num_chunks, 1)


def _batch_size(batch: Any, num_chunks: int) -> int:
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
  if not sizes or None in sizes or len(sizes) != 1:
    raise ValueError(
      'num_chunks > 1 needs a batch whose leaves all have the same leading (example) axis, got '
      f'leading sizes {sorted(s for s in sizes if s is not None)} '
      f'{"and scalars" if None in sizes else ""}.'
    )
  (size,) = sizes
  if size % num_chunks:
    raise ValueError(f'num_chunks={num_chunks} must divide the batch size {size}.')
  return size


def chunked_mean(fn: Callable[[Any], Any], batch: Any, num_chunks: int) -> Any:
  r"""The mean of ``fn(chunk)`` over ``num_chunks`` equal chunks of ``batch``.

  .. math::

    \frac{1}{C} \sum_{c=1}^{C} f(B_c), \qquad B_c = \{x_i : i \equiv c \pmod C\}.

  When ``fn`` is a mean over the examples of its batch (a loss, its gradient,
  a Hessian-vector product), this equals ``fn(batch)``, while only one chunk's
  activations are alive at a time (a ``lax.fori_loop``). Chunk ``c`` holds the
  examples ``c, c + C, c + 2C, ...`` (a strided split), so a batch sharded
  along its leading axis stays sharded the same way within every chunk.

  The sharpness estimators call these means in loops (Lanczos, probes,
  ascent steps), so ``fn`` runs with :func:`cpu_convolutions.canonical`
  (the same values, and XLA:CPU's fast convolutions inside loops).

  Args:
    fn: a function of a batch returning a pytree of arrays.
    batch: a pytree whose leaves share a leading axis divisible by
      ``num_chunks`` (any pytree when ``num_chunks == 1``).
    num_chunks: number of chunks (a static Python int, ``>= 1``).

  Returns:
    The mean over chunks, with the structure and dtypes of ``fn``'s output.
  """
  check_num_chunks(num_chunks)
  fn = cpu_convolutions.canonical(fn)
  if num_chunks == 1:
    return fn(batch)
  size = _batch_size(batch, num_chunks)
  strided = jax.tree.map(lambda x: x.reshape(size // num_chunks, num_chunks, *x.shape[1:]), batch)

  def chunk(c):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, c, 1, keepdims=False), strided)

  shapes = jax.eval_shape(fn, chunk(0))
  total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(c, total):
    return optax.tree.add(total, fn(chunk(c)))

  total = jax.lax.fori_loop(0, num_chunks, body, total)
  return jax.tree.map(lambda t: (t / num_chunks).astype(t.dtype), total)
