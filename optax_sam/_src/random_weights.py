r"""Random weight perturbation: Gaussian noise scaled to each output filter's norm.

m-RWP (Li et al., TMLR 2024) replaces SAM's ascent by noise,

.. math::

  e_i \sim \mathcal{N}\big(0, (\sigma \|W_i\|)^2\big)

for every entry of output filter :math:`i` of a kernel :math:`W` (for a vector
leaf, :math:`\sigma (\|w\| + 10^{-16})` over the whole vector), and mixes the two
gradients, :math:`(1 - \lambda) g + \lambda \nabla L(w + e)`
(:func:`mixed_correction`). The noise does not depend on the clean gradient,
so the two gradients of a step do not depend on each other. The PRNG key is the
perturbation's state: the draws are reproducible and identical on every device
of a data-parallel axis (the state is replicated).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import adaptive as adaptive_lib
from optax_sam._src import numerics, perturbations

VECTOR_EPS = 1e-16  # added to a vector leaf's norm, as the official code does


class NoiseState(NamedTuple):
  """The state of :func:`random_perturbation`: the PRNG key of the next draw (``uint32[2]``)."""

  key: jax.Array


def filter_scale(w: jax.Array, output_axes: tuple[int, ...]) -> jax.Array:
  """The norm of each output filter of ``w``, broadcast over the filter (vectors: the whole norm).

  Args:
    w: a parameter leaf.
    output_axes: the axes that index the filters (Flax's ``Dense`` and ``Conv``: ``(-1,)``).

  Returns:
    An array shaped like ``w`` (float32 or wider).
  """
  dtype = jnp.promote_types(jnp.float32, w.dtype)
  w = w.astype(dtype)
  if w.ndim <= 1:
    return jnp.broadcast_to(jnp.linalg.norm(w.ravel()) + VECTOR_EPS, w.shape)
  kept = {a % w.ndim for a in output_axes}
  reduced = tuple(a for a in range(w.ndim) if a not in kept)
  return jnp.broadcast_to(jnp.sqrt(jnp.sum(jnp.square(w), axis=reduced, keepdims=True)), w.shape)


def random_perturbation(
  sigma: Any = 0.01,
  *,
  seed: int = 0,
  output_axes: tuple[int, ...] = (-1,),
  perturb_mask: adaptive_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Maps a gradient to Gaussian noise :math:`e`, each filter's scaled to its norm (see module).

  The gradient only gives the shapes; the draw uses the state's key, split at
  every call (one draw per leaf, in tree order).

  Args:
    sigma: the noise's scale relative to each filter's norm (``>= 0``) or a
      schedule of the step count.
    seed: the seed of the first key.
    output_axes: the axes of a kernel that index its output filters (``(-1,)``:
      Flax's ``Dense`` and ``Conv``; PyTorch's is ``(0,)``).
    perturb_mask: the leaves perturbed (``None``: all).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``update(g, state, params)``;
    ``params`` is required.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> tx = optax_sam.random_perturbation(sigma=0.1)
    >>> w = {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}
    >>> e, state = tx.update(w, tx.init(w), w)
    >>> e['kernel'].shape
    (3, 2)

  References:
    Li et al., 2024, "Revisiting Random Weight Perturbation for Efficiently
    Improving Generalization": https://arxiv.org/abs/2404.00357
  """
  if not callable(sigma):
    numerics.check_range('sigma', sigma)
  output_axes = tuple(output_axes)
  scheduled = callable(sigma)

  def init_fn(params):
    del params
    key = jax.random.key_data(jax.random.key(seed))
    count = jnp.zeros([], jnp.int32)
    return (NoiseState(key), perturbations.AscentState(count)) if scheduled else NoiseState(key)

  def update_fn(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError('random_perturbation scales to the weights: call update(g, state, params).')
    noise_state = state[0] if scheduled else state
    scale = sigma(state[1].count) if scheduled else sigma
    key, draw = jax.random.split(jax.random.wrap_key_data(noise_state.key))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(draw, max(len(leaves), 1))
    noise = [
      jax.random.normal(k, w.shape, jnp.promote_types(jnp.float32, w.dtype))
      * filter_scale(w, output_axes)
      * jnp.asarray(scale, jnp.promote_types(jnp.float32, w.dtype))
      for k, w in zip(keys, leaves, strict=False)
    ]
    e = jax.tree.unflatten(treedef, noise)
    e = perturbations.restrict(e, params, perturb_mask)
    e = jax.tree.map(lambda x, g: x.astype(jnp.result_type(g)), e, updates)
    new = NoiseState(jax.random.key_data(key))
    if scheduled:
      return e, (new, perturbations.AscentState(optax.safe_increment(state[1].count)))
    return e, new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
