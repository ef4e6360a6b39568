"""The SAM step's own statistics: what a step computes anyway, kept for the training loop.

Opt-in (``statistics=True`` on :func:`sharpness_aware` and the aliases). When
off, the state holds an empty ``optax.EmptyState()`` in their place and the step
computes nothing for them.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import numerics, perturbations
from optax_sam._src import state as state_lib


class SAMStatistics(NamedTuple):
  r"""Statistics of the last SAM step, scalars in float32 (or wider, like the params).

  Attributes:
    grad_norm: :math:`\|g\|`, the clean gradient's norm.
    adv_grad_norm: :math:`\|g_{adv}\|`, the norm of the gradient at the
      perturbed weights; ``adv_grad_norm / grad_norm`` is the ratio StableSAM
      renormalizes away (Figure 1 of Tan et al.).
    perturbation_norm: :math:`\|e\|`, the perturbation as computed.
    cosine: :math:`\cos(g, g_{adv})`.
    ema_cosine: for F-SAM, :math:`\cos(m_{t-1}, g)`, the cosine between the
      EMA the step removed from ``g`` and ``g`` itself (how much of the
      minibatch gradient is the full-gradient estimate); 0 for perturbations
      without an EMA and at F-SAM's first step, whose EMA is still zero.
    moved_fraction: the share of coordinates of the weights the perturbed pass
      saw that differ from the clean weights: below 1 when the perturbation
      rounds away in the weights' dtype (bfloat16, float16), or where ``e`` is 0.
    effective_ratio: :math:`\|w_{adv} - w\| / \|e\|`, the length of the
      perturbation the perturbed pass saw relative to the one computed (1 up to
      rounding in float32; 0 when ``e = 0``). Rounding to a coarse grid can
      keep the length while changing the direction, so read it with
      ``effective_cosine``.
    effective_cosine: :math:`\cos(w_{adv} - w, e)`, how much of the computed
      perturbation's direction the perturbed pass saw (1 up to float32
      rounding).
    directional_sharpness: :math:`\langle g_{adv} - g, e\rangle / \|e\|^2`,
      the loss's curvature along the perturbation from the two gradients the
      step has: a finite difference of :math:`e^\top H e / \|e\|^2` (exact for a
      quadratic loss; :func:`optax_sam.sharpness.directional_sharpness` gives
      the Hessian's value along any direction, for one more product).
  """

  grad_norm: jax.Array
  adv_grad_norm: jax.Array
  perturbation_norm: jax.Array
  cosine: jax.Array
  ema_cosine: jax.Array
  moved_fraction: jax.Array
  effective_ratio: jax.Array
  effective_cosine: jax.Array
  directional_sharpness: jax.Array


def zeros(params: optax.Params) -> SAMStatistics:
  """Statistics before the first step: all zero, in the params' accumulation dtype."""
  dtype = numerics.accumulation_dtype(params)
  return SAMStatistics(*(jnp.zeros([], dtype) for _ in SAMStatistics._fields))


def _cosine(x: Any, y: Any, norm_x: jax.Array, norm_y: jax.Array) -> jax.Array:
  return numerics.safe_ratio(numerics.vdot(x, y).astype(norm_x.dtype), norm_x * norm_y)


def _previous_ema(perturbation_state: Any) -> Optional[Any]:
  """F-SAM's EMA as the step found it, or ``None`` if the perturbation keeps none."""
  found = state_lib.find_states(perturbation_state, perturbations.FriendlyState)
  return found[0][1].ema if found else None


def clean_half(
  g: optax.Updates, e: optax.Updates, previous_perturbation_state: Any, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(||g||, ||e||, cos(m_prev, g))``: what the clean pass and the perturbation tell."""
  grad_norm = numerics.global_norm(g).astype(dtype)
  # A plain fused reduction: the overflow guard's conditional would materialize e,
  # which the step otherwise fuses into w + e (a perturbation above 1e19 is no SAM step).
  perturbation_norm = optax.tree.norm(optax.tree.cast(e, dtype)).astype(dtype)
  ema = _previous_ema(previous_perturbation_state)
  if ema is None:
    ema_cosine = jnp.zeros([], dtype)
  else:
    ema_norm = numerics.global_norm(ema).astype(dtype)
    ema_cosine = _cosine(ema, g, ema_norm, grad_norm)
  return grad_norm, perturbation_norm, ema_cosine


def _as_stored(x: jax.Array, dtype: Any) -> jax.Array:
  """``x`` cast to ``dtype``, rounded as ``x``'s own dtype stores it."""
  info = jnp.finfo(jnp.result_type(x))
  return jax.lax.reduce_precision(x.astype(dtype), info.nexp, info.nmant)


def rounding(
  params: optax.Params, perturbed: optax.Params, e: optax.Updates, perturbation_norm: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(moved_fraction, effective_ratio, effective_cosine)`` of the perturbed weights."""
  dtype = perturbation_norm.dtype
  leaves, adv, e = jax.tree.leaves(params), jax.tree.leaves(perturbed), jax.tree.leaves(e)
  size = sum(jnp.size(w) for w in leaves)
  moved = sum(
    jnp.sum(_as_stored(a, dtype) != w.astype(dtype), dtype=dtype)
    for w, a in zip(leaves, adv, strict=True)
  )
  # Plain fused reductions of (w_adv - w) / ||e||, whose entries are about e's: no
  # overflow guard, whose conditional would materialize the difference. XLA may
  # keep w + e at excess precision inside a fusion (xla_allow_excess_precision),
  # so w_adv is rounded to its dtype explicitly: the value the weights hold.
  inverse = numerics.safe_ratio(jnp.ones([], dtype), perturbation_norm)
  moves = [
    (_as_stored(a, dtype) - w.astype(dtype)) * inverse for w, a in zip(leaves, adv, strict=True)
  ]
  ratio = jnp.sqrt(sum(jnp.sum(jnp.square(m)) for m in moves))
  along = sum(jnp.sum(m * (d.astype(dtype) * inverse)) for m, d in zip(moves, e, strict=True))
  return jnp.asarray(moved / max(size, 1), dtype), ratio, numerics.safe_ratio(along, ratio)


def before_perturbed_pass(
  g: optax.Updates,
  e: optax.Updates,
  params: optax.Params,
  perturbed: optax.Params,
  previous_perturbation_state: Any,
) -> SAMStatistics:
  """The statistics known before the perturbed pass (its two fields are left at 0).

  ``g`` is the gradient the perturbation saw (per device under local
  perturbation), ``perturbed`` the weights the perturbed pass will see.
  """
  dtype = numerics.accumulation_dtype(params)
  grad_norm, perturbation_norm, ema_cosine = clean_half(g, e, previous_perturbation_state, dtype)
  moved, ratio, cosine = rounding(params, perturbed, e, perturbation_norm)
  zero = jnp.zeros([], dtype)
  return SAMStatistics(
    grad_norm, zero, perturbation_norm, zero, ema_cosine, moved, ratio, cosine, zero
  )


def after_perturbed_pass(
  stats: SAMStatistics, g: optax.Updates, g_adv: optax.Updates, e: optax.Updates
) -> SAMStatistics:
  """Completes the statistics with the perturbed gradient ``g_adv`` (``e``: the perturbation)."""
  dtype = stats.grad_norm.dtype
  adv_grad_norm = numerics.global_norm(g_adv).astype(dtype)
  cosine = _cosine(g, g_adv, stats.grad_norm, adv_grad_norm)
  # The difference first, elementwise in the accumulation dtype: g_adv and g are close, and the
  # difference of their two inner products with e would cancel most of the digits.
  difference = optax.tree.sub(optax.tree.cast(g_adv, dtype), optax.tree.cast(g, dtype))
  along = numerics.vdot(difference, e).astype(dtype)
  sharpness = numerics.safe_ratio(along, jnp.square(stats.perturbation_norm))
  return stats._replace(adv_grad_norm=adv_grad_norm, cosine=cosine, directional_sharpness=sharpness)


class TwoPhaseStatistics(NamedTuple):
  """What a two-phase state keeps for the statistics between its two calls.

  Attributes:
    values: the statistics (of the last completed step after a descent call;
      the clean half of the current step after an ascent call).
    clean_grads: the clean gradient, for :math:`\\cos(g, g_{adv})` (one
      parameter-sized buffer, kept only when statistics are on).
  """

  values: SAMStatistics
  clean_grads: optax.Updates


def step_statistics(state: optax.OptState) -> SAMStatistics:
  """The statistics of the last SAM step, from a state built with ``statistics=True``.

  ``state`` may be the SAM state or any state containing it (``optax.chain``,
  ``optax.inject_hyperparams``, ``nnx.Optimizer``'s ``opt_state`` made pure
  with ``nnx.as_pure``). Call it inside or outside ``jit``; it only reads.

  Args:
    state: the optimizer state.

  Returns:
    A :class:`SAMStatistics` of scalar arrays (zeros before the first step).
    In two-phase mode it describes the last completed step; between the two
    calls of a step it holds the current step's values known so far, with
    ``adv_grad_norm`` and ``cosine`` at 0 until the second call.

  Raises:
    ValueError: if the state holds no statistics (built without
      ``statistics=True``) or several SAM states.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> tx = optax_sam.sam(optax.sgd(0.1), rho=0.1, statistics=True)
    >>> w = jnp.array([1.0, -1.0])
    >>> _, state = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))
    >>> stats = optax_sam.step_statistics(state)
    >>> print(f'{float(stats.grad_norm):.3f} {float(stats.perturbation_norm):.3f}')
    5.657 0.100

  References:
    Tan et al., 2024: https://arxiv.org/abs/2401.07250 (the norm ratio);
    Li et al., 2024: https://arxiv.org/abs/2403.12350 (F-SAM's EMA)
  """
  is_node = lambda x: isinstance(x, (SAMStatistics, TwoPhaseStatistics))
  found = [s for s in jax.tree.leaves(state, is_leaf=is_node) if is_node(s)]
  found = [s.values if isinstance(s, TwoPhaseStatistics) else s for s in found]
  if not found:
    raise ValueError(
      'the optimizer state holds no SAM statistics: build the optimizer with statistics=True, '
      'e.g. optax_sam.sam(base, statistics=True).'
    )
  if len(found) > 1:
    raise ValueError('step_statistics found more than one SAM state in the state.')
  return found[0]
