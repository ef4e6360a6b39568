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

m-ARWP adapts the noise to the curvature: with :math:`F` the moving sum of the
squared perturbed gradients, :math:`F \leftarrow \beta F + \nabla L(w + e)^2`
(:func:`arwp_correction` keeps it in the correction's memory, from the second
gradient of each SAM step), each filter's noise is divided by
:math:`\sqrt{1 + \eta F_i}` with :math:`F_i` the sum of :math:`F` over the
filter (a vector leaf: each entry's own).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import adaptive as adaptive_lib
from optax_sam._src import corrections, numerics, perturbations

VECTOR_EPS = 1e-16  # added to a vector leaf's norm, as the official code does


class NoiseState(NamedTuple):
  """The state of :func:`random_perturbation`: the PRNG key of the next draw (``uint32[2]``)."""

  key: jax.Array


class FisherMemory(NamedTuple):
  """The memory of :func:`arwp_correction`.

  Attributes:
    fisher: :math:`F`, the moving sum :math:`\beta F + g_{adv}^2` of the squared perturbed
      gradients, entry by entry, like the parameters (float32 or wider).
  """

  fisher: Any


def _reduced_axes(ndim: int, output_axes: tuple[int, ...]) -> tuple[int, ...]:
  """The axes a kernel's filter spans: all but the output axes."""
  kept = {a % ndim for a in output_axes}
  return tuple(a for a in range(ndim) if a not in kept)


def filter_fisher(f: jax.Array, output_axes: tuple[int, ...]) -> jax.Array:
  """The sum of ``f`` over each output filter, broadcast over the filter (vectors: per entry)."""
  if f.ndim <= 1:
    return f
  return jnp.broadcast_to(
    jnp.sum(f, axis=_reduced_axes(f.ndim, output_axes), keepdims=True), f.shape
  )


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
  reduced = _reduced_axes(w.ndim, output_axes)
  return jnp.broadcast_to(jnp.sqrt(jnp.sum(jnp.square(w), axis=reduced, keepdims=True)), w.shape)


def random_perturbation(
  sigma: Any = 0.01,
  *,
  seed: int = 0,
  output_axes: tuple[int, ...] = (-1,),
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eta: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
  r"""Maps a gradient to Gaussian noise :math:`e`, each filter's scaled to its norm (see module).

  The gradient only gives the shapes; the draw uses the state's key, split at
  every call (one draw per leaf, in tree order). With ``eta > 0`` (m-ARWP) each
  filter's noise is divided by :math:`\sqrt{1 + \eta F_i}`, :math:`F` read from
  the extra argument ``memory``, the :class:`FisherMemory` of
  :func:`arwp_correction` (the SAM mechanism passes the correction's memory).

  Args:
    sigma: the noise's scale relative to each filter's norm (``>= 0``) or a
      schedule of the step count.
    seed: the seed of the first key.
    output_axes: the axes of a kernel that index its output filters (``(-1,)``:
      Flax's ``Dense`` and ``Conv``; PyTorch's is ``(0,)``).
    perturb_mask: the leaves perturbed (``None``: all).
    eta: m-ARWP's weight of the squared perturbed gradients (``>= 0``; 0: m-RWP).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``update(g, state, params)``;
    ``params`` is required (and, with ``eta > 0``, ``memory``).

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
  numerics.check_range('eta', eta)
  # Whether the noise reads F: decided when the factory runs (eta may be an injected array).
  reads_fisher = not numerics.is_concrete(eta) or eta > 0
  output_axes = tuple(output_axes)
  scheduled = callable(sigma)

  def init_fn(params):
    del params
    key = jax.random.key_data(jax.random.key(seed))
    count = jnp.zeros([], jnp.int32)
    return (NoiseState(key), perturbations.AscentState(count)) if scheduled else NoiseState(key)

  def update_fn(updates, state, params=None, *, memory: Any = None, **extra):
    del extra
    if params is None:
      raise ValueError('random_perturbation scales to the weights: call update(g, state, params).')
    if reads_fisher and not isinstance(memory, FisherMemory):
      raise ValueError(
        'random_perturbation(eta > 0) divides the noise by sqrt(1 + eta F), F read from the '
        'memory of arwp_correction: use optax_sam.marwp, or sharpness_aware with '
        f'arwp_correction, which pass it as update(..., memory=...); got memory={memory!r}.'
      )
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
    if reads_fisher:
      e = jax.tree.map(
        lambda x, f: x / jnp.sqrt(1 + eta * filter_fisher(f.astype(x.dtype), output_axes)),
        e,
        memory.fisher,
      )
    e = perturbations.restrict(e, params, perturb_mask)
    e = jax.tree.map(lambda x, g: x.astype(jnp.result_type(g)), e, updates)
    new = NoiseState(jax.random.key_data(key))
    if scheduled:
      return e, (new, perturbations.AscentState(optax.safe_increment(state[1].count)))
    return e, new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def arwp_correction(lmbda: float = 0.5, *, beta: float = 0.9) -> corrections.Correction:
  r"""m-ARWP's correction: m-RWP's mixing, keeping the moving sum of squared perturbed gradients.

  .. math::

    g_{sam} = (1 - \lambda) g + \lambda g_{adv}, \qquad
    F \leftarrow \beta F + g_{adv}^2 \ \text{(after each SAM step, entry by entry)},

  :func:`mixed_correction` with a :class:`FisherMemory` (:math:`F_0 = 0`; no
  :math:`1 - \beta` factor, as the official loop) that
  :func:`random_perturbation` with ``eta > 0`` reads. The perturbed gradient is
  averaged over the devices and micro-batch groups first.

  Args:
    lmbda: the weight of the perturbed gradient, in ``[0, 1]``.
    beta: the decay of :math:`F`, in ``[0, 1]``.

  Returns:
    A :class:`Correction` with ``observe``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> c = optax_sam.arwp_correction(lmbda=0.5, beta=0.9)
    >>> memory = c.init_memory(jnp.zeros(2))
    >>> memory = c.observe(c.observe(memory, jnp.array([1.0, 2.0])), jnp.array([1.0, 0.0]))
    >>> memory.fisher  # 0.9 [1, 4] + [1, 0]
    Array([1.9, 3.6], dtype=float32)

  References:
    Li et al., 2024, "Revisiting Random Weight Perturbation for Efficiently
    Improving Generalization": https://arxiv.org/abs/2404.00357
  """
  numerics.check_range('lmbda', lmbda, 0.0, 1.0)
  numerics.check_range('beta', beta, 0.0, 1.0)

  def init_memory(params):
    return FisherMemory(
      jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), numerics.accumulation_dtype(w)), params)
    )

  def observe(memory, g_adv):
    fisher = jax.tree.map(
      lambda f, g: beta * f + jnp.square(g.astype(f.dtype)), memory.fisher, g_adv
    )
    return FisherMemory(fisher)

  return corrections.mixed_correction(lmbda)._replace(init_memory=init_memory, observe=observe)
