"""Corrections: how the gradient at the perturbed point becomes the SAM gradient.

A :class:`Correction` is three pure functions. ``prepare(g, w)`` takes what the
correction needs from the clean pass (nothing, the clean norm, or the clean
gradient); ``apply(prepared, g_adv, w_adv)`` turns the gradient at the
perturbed weights into the gradient handed to the base optimizer. In two-phase
mode the prepared value is what the state carries between the two calls, and
``init(w)`` gives its initial value.

A correction may also keep a memory across steps (LookSAM's direction):
``remember(memory, prepared, g_sam)`` runs after each SAM step and
``reuse(memory, g)`` gives the gradient of a plain step (one that a ``when``
policy made without a second gradient); the defaults keep nothing and pass
``g`` through. ``observe(memory, g_adv)`` runs after each SAM step too, with the
perturbed gradient (m-ARWP's moving average of its squares).
"""

from typing import Any, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import adaptive as adaptive_lib
from optax_sam._src import numerics


class InitFn(Protocol):
  """``init(w) -> value``: an initial prepared value or memory (zeros) for the weights ``w``."""

  def __call__(self, params: optax.Params) -> Any: ...


class PrepareFn(Protocol):
  """``prepare(g, w) -> prepared``: what ``apply`` needs from the clean gradient ``g`` at ``w``."""

  def __call__(self, grads: optax.Updates, params: optax.Params) -> Any: ...


class ApplyFn(Protocol):
  """``apply(prepared, g_adv, w_adv) -> g_sam``: the gradient handed to the base optimizer."""

  def __call__(
    self, prepared: Any, adv_grads: optax.Updates, adv_params: optax.Params
  ) -> optax.Updates: ...


class RememberFn(Protocol):
  """``remember(memory, prepared, g_sam) -> memory``: the memory after a SAM step."""

  def __call__(self, memory: Any, prepared: Any, sam_grads: optax.Updates) -> Any: ...


class ReuseFn(Protocol):
  """``reuse(memory, g) -> g_plain``: the gradient handed to the base optimizer on a plain step."""

  def __call__(self, memory: Any, grads: optax.Updates) -> optax.Updates: ...


class ObserveFn(Protocol):
  """``observe(memory, g_adv) -> memory``: the memory after a SAM step, from ``g_adv``."""

  def __call__(self, memory: Any, adv_grads: optax.Updates) -> Any: ...


class OutsideFn(Protocol):
  """``outside(memory, prepared, g_adv) -> updates``: an update added to the base optimizer's."""

  def __call__(self, memory: Any, prepared: Any, adv_grads: optax.Updates) -> optax.Updates: ...


class Correction(NamedTuple):
  """A gradient correction for the SAM wrapper.

  Attributes:
    init: ``init(w) -> prepared``: an initial prepared value (zeros), with the
      structure, dtypes and shardings ``prepare`` gives.
    prepare: ``prepare(g, w) -> prepared``: what ``apply`` needs from the clean
      gradient ``g`` at the clean weights ``w`` (a fixed-structure tree of arrays).
    apply: ``apply(prepared, g_adv, w_adv) -> g_sam``: the corrected gradient
      from the gradient ``g_adv`` at the perturbed weights ``w_adv``.
    init_memory: ``init_memory(w) -> memory``: the memory kept across steps
      (default: none).
    remember: ``remember(memory, prepared, g_sam) -> memory``: after a SAM
      step, from the clean pass's prepared value and the SAM gradient (both
      averaged over devices); ``None``: the memory is kept as it is.
    reuse: ``reuse(memory, g) -> g_plain``: the gradient handed to the base
      optimizer on a plain step; ``None``: ``g`` itself.
    outside: ``outside(memory, prepared, g_adv) -> updates``: on a SAM step, an
      update added to the base optimizer's, outside it (WSAM's decoupled
      step); ``None``: nothing. Plain steps add nothing.
    observe: ``observe(memory, g_adv) -> memory``: after a SAM step (after
      ``remember``), from the perturbed gradient averaged over the members
      (devices, micro-batch groups); ``None``: nothing. The perturbation reads
      the memory as its extra argument ``memory`` (m-ARWP's noise scale).
  """

  init: InitFn
  prepare: PrepareFn
  apply: ApplyFn
  init_memory: InitFn = lambda w: optax.EmptyState()
  remember: Optional[RememberFn] = None
  reuse: Optional[ReuseFn] = None
  outside: Optional[OutsideFn] = None
  observe: Optional[ObserveFn] = None


def no_correction() -> Correction:
  r"""The identity correction of SAM, USAM, ASAM and F-SAM: :math:`g_{sam} = g_{adv}`.

  Args:
    None: the identity has no hyperparameters.

  Returns:
    A :class:`Correction` that keeps nothing and returns ``g_adv`` unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> c = optax_sam.no_correction()
    >>> c.apply(c.prepare(jnp.ones(2), jnp.ones(2)), jnp.array([1.0, 2.0]), None)
    Array([1., 2.], dtype=float32)

  References:
    Foret et al., 2021: https://arxiv.org/abs/2010.01412
  """
  return Correction(
    init=lambda w: optax.EmptyState(),
    prepare=lambda g, w: optax.EmptyState(),
    apply=lambda prepared, g_adv, w_adv: g_adv,
  )


def stable_correction(
  *,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
) -> Correction:
  r"""StableSAM's renormalization: rescale ``g_adv`` to the clean gradient's norm.

  .. math::

    g_{sam} = g_{adv} \frac{\|T(w) g\|}{\|T(w + e) g_{adv}\| + \epsilon},

  with ``T`` as in :func:`ascent` when ``adaptive`` (each norm weighted at the
  weights its gradient was taken at, as in the official code) and ``T = 1``
  otherwise. ``g`` is the clean gradient (with F-SAM too, not its direction
  ``d``). Norms are computed in float32 or wider; a zero ``g_adv`` stays zero.

  Args:
    adaptive: weight both norms by ``T``.
    eta: offset in ``T = |w| + eta`` (``>= 0``).
    adaptive_mask: leaves scaled by ``T`` (``None``: all).
    eps: added to the perturbed gradient's norm (``>= 0``).

  Returns:
    A :class:`Correction` whose prepared value is the clean norm (a scalar).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> c = optax_sam.stable_correction()
    >>> prepared = c.prepare(jnp.array([3.0, 4.0]), jnp.zeros(2))  # ||g|| = 5
    >>> c.apply(prepared, jnp.array([0.0, 10.0]), jnp.zeros(2))
    Array([0., 5.], dtype=float32)

  References:
    Tan et al., 2024, "Stabilizing Sharpness-Aware Minimization Through A
    Simple Renormalization Strategy": https://arxiv.org/abs/2401.07250
  """
  numerics.check_range('eta', eta)
  numerics.check_range('eps', eps)
  numerics.check_flag('adaptive', adaptive)

  def weighted_norm(grads, params):
    if adaptive:
      grads = adaptive_lib.scaled(grads, adaptive_lib.adaptive_scale(params, eta, adaptive_mask))
    return numerics.global_norm(grads)

  def apply(clean_norm, g_adv, w_adv):
    adv_norm = weighted_norm(g_adv, w_adv)
    ratio = numerics.safe_ratio(
      clean_norm.astype(adv_norm.dtype), adv_norm + jnp.asarray(eps, adv_norm.dtype)
    )
    return numerics.scale_tree(g_adv, ratio)

  def init(params):
    return jnp.zeros([], numerics.accumulation_dtype(params))

  return Correction(init=init, prepare=weighted_norm, apply=apply)


def gsam_correction(alpha: float = 0.4, *, eps: float = 1e-12) -> Correction:
  r"""GSAM's correction: remove ``alpha`` times the part of ``g`` orthogonal to ``g_adv``.

  .. math::

    g_{sam} = g_{adv} - \alpha \left(g - \frac{\langle g, g_{adv}\rangle}
      {\|g_{adv}\|^2 + \epsilon} g_{adv}\right).

  The dot product and norm are computed in float32 or wider.

  Args:
    alpha: weight of the orthogonal component (``>= 0``).
    eps: added to :math:`\|g_{adv}\|^2` (``>= 0``).

  Returns:
    A :class:`Correction` whose prepared value is the clean gradient ``g``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> c = optax_sam.gsam_correction(alpha=0.5)
    >>> g, g_adv = jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0])
    >>> c.apply(c.prepare(g, None), g_adv, None)  # g's orthogonal part: [0, 1]
    Array([ 2. , -0.5], dtype=float32)

  References:
    Zhuang et al., 2022, "Surrogate Gap Guided Sharpness-Aware Minimization":
    https://arxiv.org/abs/2203.08065
  """
  numerics.check_range('alpha', alpha)
  numerics.check_range('eps', eps)

  def projection(g, g_adv):
    """``<g, g_adv> / (||g_adv||^2 + eps)``, finite whenever the gradients are."""
    norm = numerics.global_norm(g_adv)
    dot = numerics.vdot(g, g_adv).astype(norm.dtype)
    eps_ = jnp.asarray(eps, norm.dtype)

    def rescaled(_):
      # The same ratio as <g, g_adv / n> / (n + eps / n): no product overflows.
      unit = optax.tree.scale(numerics.safe_ratio(1, norm), optax.tree.cast(g_adv, norm.dtype))
      return numerics.safe_ratio(numerics.vdot(g, unit), norm + numerics.safe_ratio(eps_, norm))

    overflow = jnp.isinf(dot) | jnp.isinf(norm * norm)
    direct = lambda _: numerics.safe_ratio(dot, norm * norm + eps_)
    return jax.lax.cond(overflow, rescaled, direct, None)

  def apply(g, g_adv, w_adv):
    del w_adv
    coef = projection(g, g_adv)
    dtype = coef.dtype
    return jax.tree.map(
      lambda a, c: (
        a.astype(dtype) - jnp.asarray(alpha, dtype) * (c.astype(dtype) - coef * a.astype(dtype))
      ).astype(jnp.result_type(a)),
      g_adv,
      g,
    )

  return Correction(init=optax.tree.zeros_like, prepare=lambda g, w: g, apply=apply)


def look_sam_correction(alpha: float = 0.7, *, eps: float = 1e-12) -> Correction:
  r"""LookSAM's correction: remember the direction SAM adds to ``g``, reuse it on plain steps.

  On a SAM step the base optimizer gets ``g_adv`` unchanged, and the memory
  becomes the unit component of ``g_adv`` orthogonal to the clean ``g``:

  .. math::

    v = g_{adv} - \frac{\langle g_{adv}, g\rangle}{\|g\|^2 + \epsilon} g, \qquad
    \hat v = \frac{v}{\|v\|};

  on a plain step the base optimizer gets :math:`g + \alpha \|g\| \hat v`
  (global norms, as in the paper's Algorithm 1; a zero ``v`` gives
  :math:`\hat v = 0`). Used with ``when=every(k)`` by :func:`look_sam`.

  Args:
    alpha: weight of the reused direction (``>= 0``; ``0`` gives plain steps).
    eps: added to :math:`\|g\|^2` (``>= 0``).

  Returns:
    A :class:`Correction` whose prepared value is the clean gradient and whose
    memory is :math:`\hat v` (one parameter-sized buffer, in the gradient's dtype).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> c = optax_sam.look_sam_correction(alpha=0.5)
    >>> g, g_adv = jnp.array([3.0, 0.0]), jnp.array([1.0, 2.0])
    >>> memory = c.remember(c.init_memory(g), c.prepare(g, None), g_adv)  # v = [0, 2]
    >>> c.reuse(memory, jnp.array([0.0, 4.0]))  # g + 0.5 * 4 * [0, 1]
    Array([0., 6.], dtype=float32)

  References:
    Liu et al., 2022, "Towards Efficient and Scalable Sharpness-Aware
    Minimization": https://arxiv.org/abs/2203.02714
  """
  numerics.check_range('alpha', alpha)
  numerics.check_range('eps', eps)

  def remember(memory, g, g_sam):
    norm = numerics.global_norm(g)
    dot = numerics.vdot(g_sam, g).astype(norm.dtype)
    coef = numerics.safe_ratio(dot, norm * norm + jnp.asarray(eps, norm.dtype))
    v = jax.tree.map(lambda a, c: a.astype(coef.dtype) - coef * c.astype(coef.dtype), g_sam, g)
    unit = numerics.safe_ratio(1, numerics.global_norm(v))
    return jax.tree.map(lambda x, m: (x * unit).astype(m.dtype), v, memory)

  def reuse(memory, g):
    norm = numerics.global_norm(g)
    scale = jnp.asarray(alpha, norm.dtype) * norm
    return jax.tree.map(
      lambda x, m: (x.astype(norm.dtype) + scale * m.astype(norm.dtype)).astype(x.dtype), g, memory
    )

  return Correction(
    init=optax.tree.zeros_like,
    prepare=lambda g, w: g,
    apply=lambda g, g_adv, w_adv: g_adv,
    init_memory=optax.tree.zeros_like,
    remember=remember,
    reuse=reuse,
  )


def clip_by_global_norm(tree: Any, max_norm: Optional[float]) -> Any:
  """``tree * min(1, max_norm / (||tree|| + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``."""
  if max_norm is None:
    return tree
  norm = numerics.global_norm(tree)
  factor = jnp.minimum(1, jnp.asarray(max_norm, norm.dtype) / (norm + 1e-6))
  return numerics.scale_tree(tree, factor)


def _mix(g: Any, g_adv: Any, weight: Any) -> Any:
  """``g + weight (g_adv - g)`` leaf by leaf, in float32 or wider."""
  dtype = numerics.accumulation_dtype(g)
  weight = jnp.asarray(weight, dtype)
  return jax.tree.map(
    lambda a, c: (c.astype(dtype) + weight * (a.astype(dtype) - c.astype(dtype))).astype(
      jnp.result_type(a)
    ),
    g_adv,
    g,
  )


def mixed_correction(weight: float = 0.5, *, max_norm: Optional[float] = None) -> Correction:
  r"""A weighted sum of the clean and the perturbed gradients.

  .. math::

    g_{sam} = g + w (g_{adv} - g) = (1 - w) g + w g_{adv},

  WSAM's coupled rule (:math:`w = \gamma / (1 - \gamma)`, which may exceed 1)
  and the mixing of random weight perturbation (m-RWP, :math:`w = \lambda`).
  With ``max_norm`` both gradients are first clipped to that global norm.

  Args:
    weight: the weight ``w`` of the perturbed gradient's difference (``>= 0``).
    max_norm: clip ``g`` and ``g_adv``, each, to this global norm (``> 0``);
      ``None``: no clipping.

  Returns:
    A :class:`Correction` whose prepared value is the (clipped) clean gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> c = optax_sam.mixed_correction(weight=3.0)
    >>> g, g_adv = jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0])
    >>> c.apply(c.prepare(g, None), g_adv, None)  # g + 3 (g_adv - g)
    Array([ 4., -2.], dtype=float32)

  References:
    Yue et al., 2023, "Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term": https://arxiv.org/abs/2305.15817
  """
  numerics.check_range('weight', weight)
  if max_norm is not None:
    numerics.check_range('max_norm', max_norm, low=1e-300)

  return Correction(
    init=optax.tree.zeros_like,
    prepare=lambda g, w: clip_by_global_norm(g, max_norm),
    apply=lambda g, g_adv, w_adv: _mix(g, clip_by_global_norm(g_adv, max_norm), weight),
  )


class DecoupledMemory(NamedTuple):
  """Memory of :func:`decoupled_correction` with a learning-rate schedule.

  Attributes:
    count: SAM steps taken so far (the schedule's index).
  """

  count: jax.Array


def decoupled_correction(
  weight: float,
  learning_rate: Any,
  *,
  max_norm: Optional[float] = None,
) -> Correction:
  r"""WSAM's decoupled rule: the base optimizer gets ``g``, the sharpness term is added outside it.

  .. math::

    u = \mathrm{base}(g) - \eta_t \, w \, (g_{adv} - g),

  so the sharpness term sees no momentum, no adaptive scaling and no weight
  decay of the base optimizer. With ``max_norm`` both gradients are first
  clipped to that global norm.

  Args:
    weight: the weight ``w`` of the sharpness term (``>= 0``).
    learning_rate: :math:`\eta_t`, a number (``>= 0``) or an optax schedule
      indexed by the number of SAM steps taken (the base optimizer's step
      count, unless a ``when`` policy makes plain steps).
    max_norm: clip ``g`` and ``g_adv``, each, to this global norm (``> 0``).

  Returns:
    A :class:`Correction` with an ``outside`` update; its prepared value is
    the (clipped) clean gradient, its memory a step count for a schedule.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> c = optax_sam.decoupled_correction(weight=2.0, learning_rate=0.1)
    >>> g, g_adv = jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0])
    >>> prepared = c.prepare(g, None)
    >>> c.apply(prepared, g_adv, None)   # the base optimizer gets g
    Array([1., 1.], dtype=float32)
    >>> c.outside(c.init_memory(g), prepared, g_adv)  # -0.1 * 2 * (g_adv - g)
    Array([-0.2,  0.2], dtype=float32)

  References:
    Yue et al., 2023, "Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term": https://arxiv.org/abs/2305.15817
  """
  numerics.check_range('weight', weight)
  numerics.check_range('learning_rate', learning_rate)
  if max_norm is not None:
    numerics.check_range('max_norm', max_norm, low=1e-300)
  scheduled = callable(learning_rate)

  def init_memory(params):
    del params
    return DecoupledMemory(jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState()

  def outside(memory, g, g_adv):
    lr = learning_rate(memory.count) if scheduled else learning_rate
    dtype = numerics.accumulation_dtype(g)
    scale = -jnp.asarray(lr, dtype) * jnp.asarray(weight, dtype)
    g_adv = clip_by_global_norm(g_adv, max_norm)
    return jax.tree.map(
      lambda a, c: (scale * (a.astype(dtype) - c.astype(dtype))).astype(jnp.result_type(c)),
      g_adv,
      g,
    )

  def remember(memory, prepared, g_sam):
    del prepared, g_sam
    return DecoupledMemory(optax.safe_increment(memory.count)) if scheduled else memory

  return Correction(
    init=optax.tree.zeros_like,
    prepare=lambda g, w: clip_by_global_norm(g, max_norm),
    apply=lambda g, g_adv, w_adv: g,
    init_memory=init_memory,
    remember=remember if scheduled else None,
    outside=outside,
  )
