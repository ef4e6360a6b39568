"""Perturbations: ordinary Optax transformations that turn the clean gradient into ``e``.

A perturbation maps the clean minibatch gradient ``g`` (and the weights ``w``)
to the ascent vector ``e``; the SAM wrapper then evaluates the gradient at
``w + e``. Perturbations chain with ``optax.chain``: F-SAM is
``optax.chain(friendly_direction(...), ascent(...))``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import adaptive as adaptive_lib
from optax_sam._src import numerics

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


class AscentState(NamedTuple):
  """State of :func:`ascent` and :func:`unified_ascent` when ``rho`` (or ``lmbda``) is a schedule.

  Attributes:
    count: the step count: steps taken so far, each SAM step once (both of
      its two-phase calls together) and, under ``when=``, each plain step too.
  """

  count: jax.Array


def restrict(updates: optax.Updates, params: Optional[optax.Params], perturb_mask: Any) -> Any:
  """``updates`` with the leaves ``perturb_mask`` leaves out set to zero (SAM-ON's selection).

  ``perturb_mask`` is ``None`` (every leaf), a tree of bools (or a prefix of
  one), or a callable of the params returning one, as ``optax.masked`` takes.
  """
  if perturb_mask is None:
    return updates
  mask = adaptive_lib.resolve_mask(perturb_mask, updates if params is None else params)
  return jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), updates, mask)


def _radius_factor(lmbda: Any, norm: jax.Array, eps: Any) -> jax.Array:
  r"""Unified SAM's :math:`1 - \lambda + \lambda / (\|g\| + \epsilon)` (0 where the norm is 0)."""
  # The static ends, lmbda 1 (SAM) and 0 (USAM), take their own exact paths in _ascent.
  inverse = numerics.safe_ratio(jnp.ones([], norm.dtype), norm + jnp.asarray(eps, norm.dtype))
  lmbda = jnp.asarray(lmbda, norm.dtype)
  return (1 - lmbda) + lmbda * inverse


def _ascent(
  rho, *, lmbda, adaptive, eta=0.0, adaptive_mask=None, perturb_mask=None, eps, direction_fn=None
):
  """The ascent of SAM, USAM, ASAM, Unified SAM and GCSAM.

  ``lmbda`` is 1 (SAM's normalized ascent), 0 (USAM's), between, or a schedule;
  ``direction_fn`` (GCSAM's centralization) changes the direction, not the norm.
  """
  scheduled = callable(rho) or callable(lmbda)

  def init_fn(params):
    del params
    if scheduled:
      return AscentState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if adaptive and params is None:
      raise ValueError('ascent(adaptive=True) needs params: call update(g, state, params).')
    radius, weight, new_state = rho, lmbda, state
    if scheduled:
      radius = rho(state.count) if callable(rho) else rho
      weight = lmbda(state.count) if callable(lmbda) else lmbda
      new_state = AscentState(count=optax.safe_increment(state.count))
    g = restrict(updates, params, perturb_mask)
    dtype = numerics.accumulation_dtype(g)
    radius = jnp.asarray(radius, dtype)
    direction = g if direction_fn is None else direction_fn(g)
    if adaptive:
      t = adaptive_lib.adaptive_scale(params, eta, adaptive_mask)
      direction = adaptive_lib.scaled(direction, t, power=2)
      norm = numerics.global_norm(adaptive_lib.scaled(g, t))
    else:
      norm = numerics.global_norm(g)
    if isinstance(weight, (int, float)) and weight == 1:
      radius = numerics.safe_ratio(radius, norm + jnp.asarray(eps, norm.dtype))
    elif not (isinstance(weight, (int, float)) and weight == 0):
      radius = radius * _radius_factor(weight, norm, eps)
    e = jax.tree.map(lambda d, g: (d * radius).astype(jnp.result_type(g)), direction, updates)
    return e, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ascent(
  rho: ScalarOrSchedule = 0.05,
  *,
  normalize: bool = True,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""The SAM family's ascent step: maps a gradient ``g`` to the perturbation ``e``.

  .. math::

    e = \rho \frac{T^2 g}{\|T g\| + \epsilon} \quad (\text{normalize}), \qquad
    e = \rho \, T^2 g \quad (\text{not normalize}),

  with :math:`T = |w| + \eta` on the leaves ``adaptive_mask`` selects and
  :math:`T = 1` elsewhere when ``adaptive``, and :math:`T = 1` otherwise. This
  gives SAM (Foret et al.), unnormalized SAM and ASAM (Kwon et al.). The norm
  is computed in float32 or wider; a zero gradient gives ``e = 0``. With
  ``perturb_mask`` only the selected leaves are perturbed: the others get
  ``e = 0`` and stay out of the norm (SAM-ON, Mueller et al., perturbs only the
  normalization layers).

  Args:
    rho: radius of the perturbation (``>= 0``), or an optax schedule indexed
      by the step count (0 at the first step; each SAM step counts once, and
      under ``when=`` each plain step counts too, so the schedule follows the
      training step).
      Under ``optax.inject_hyperparams`` a schedule is indexed by that
      wrapper's own count of calls instead, which two-phase mode advances
      twice per SAM step: pass schedules for ``rho`` directly.
    normalize: divide by the gradient norm (SAM); ``False`` gives USAM.
    adaptive: scale by ``T`` (ASAM).
    eta: ASAM's offset in ``T = |w| + eta`` (``>= 0``).
    adaptive_mask: a tree of bools, or a callable of the params returning one,
      selecting the leaves scaled by ``T`` (``None``: all leaves).
    perturb_mask: a tree of bools, or a callable of the params returning one,
      selecting the leaves that are perturbed (``None``: all leaves).
    eps: added to the norm in the denominator (``>= 0``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(g, state,
    params)`` returns ``e`` in the gradient's dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> tx = optax_sam.ascent(rho=0.1)
    >>> g, w = jnp.array([3.0, 4.0]), jnp.zeros(2)
    >>> e, _ = tx.update(g, tx.init(w), w)
    >>> e
    Array([0.06, 0.08], dtype=float32)

  References:
    Foret et al., 2021: https://arxiv.org/abs/2010.01412 (SAM);
    Kwon et al., 2021: https://arxiv.org/abs/2102.11600 (ASAM);
    Andriushchenko and Flammarion, 2022: https://arxiv.org/abs/2206.06232 (USAM);
    Mueller et al., 2023: https://arxiv.org/abs/2306.15009 (SAM-ON)
  """
  numerics.check_flag('normalize', normalize)
  geometry = dict(
    adaptive=adaptive, eta=eta, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask
  )
  return unified_ascent(rho, 1.0 if normalize else 0.0, **geometry, eps=eps)


def unified_ascent(
  rho: ScalarOrSchedule = 0.1,
  lmbda: ScalarOrSchedule = 1.0,
  *,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Unified SAM's ascent: between SAM's normalized and USAM's unnormalized step.

  .. math::

    e = \rho \left(1 - \lambda + \frac{\lambda}{\|T g\| + \epsilon}\right) T^2 g,

  so ``lmbda = 1`` is :func:`ascent` (SAM) and ``lmbda = 0`` its
  ``normalize=False`` (USAM); ``T`` and ``perturb_mask`` as in :func:`ascent`.

  Args:
    rho: radius (``>= 0``) or a schedule of the step count.
    lmbda: the weight of the normalized part, in ``[0, 1]``, or a schedule of
      the step count (0 at the first step): the paper's
      :math:`\lambda_t = 1 - 1/t` is ``lambda c: 1 - 1 / (c + 1)``.
    adaptive: ASAM's scaling ``T``.
    eta: ASAM's offset (``>= 0``).
    adaptive_mask: the leaves scaled by ``T`` (``None``: all).
    perturb_mask: the leaves perturbed (``None``: all).
    eps: added to the norm (``>= 0``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` mapping ``g`` to ``e``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> tx = optax_sam.unified_ascent(rho=0.1, lmbda=0.5)
    >>> g, w = jnp.array([3.0, 4.0]), jnp.zeros(2)
    >>> e, _ = tx.update(g, tx.init(w), w)  # 0.1 * (0.5 + 0.5 / 5) * g
    >>> [round(float(x), 4) for x in e]
    [0.18, 0.24]

  References:
    Oikonomou and Loizou, 2025, "Sharpness-Aware Minimization: General
    Analysis and Improved Rates": https://arxiv.org/abs/2503.02225
  """
  numerics.check_range('rho', rho)
  numerics.check_range('lmbda', lmbda, 0.0, 1.0)
  numerics.check_range('eta', eta)
  numerics.check_range('eps', eps)
  numerics.check_flag('adaptive', adaptive)
  if not callable(lmbda) and numerics.is_concrete(lmbda):
    lmbda = float(lmbda)
  return _ascent(
    rho,
    lmbda=lmbda,
    adaptive=adaptive,
    eta=eta,
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
    eps=eps,
  )


class FriendlyState(NamedTuple):
  """State of :func:`friendly_direction`.

  Attributes:
    count: number of steps taken (0 before the first).
    ema: exponential moving average ``m`` of past (averaged) gradients.
  """

  count: jax.Array
  ema: optax.Updates


def friendly_direction(
  sigma: float = 1.0,
  lmbda: float = 0.9,
  *,
  ema_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM's ascent direction: the gradient minus its full-gradient part.

  .. math::

    d = g - \sigma m_{t-1}, \qquad m_t = \lambda m_{t-1} + (1 - \lambda) \bar g,

  and at the first step :math:`d = g`, :math:`m_1 = \bar g`. Here
  :math:`\bar g` is the gradient averaged over devices, passed as the extra
  argument ``mean_grads`` (it defaults to ``g``), so that under local
  (per-device) perturbation the EMA stays identical on every device. Chain it
  before :func:`ascent` to get F-SAM's perturbation.

  Args:
    sigma: weight of the removed full-gradient estimate, in ``[0, 1]``.
    lmbda: EMA decay, in ``[0, 1]``.
    ema_dtype: dtype of the EMA (default: the parameters' dtype).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is
    :class:`FriendlyState` (one parameter-sized buffer and a step count).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax, optax_sam
    >>> tx = optax.chain(optax_sam.friendly_direction(sigma=1.0, lmbda=0.9),
    ...                  optax_sam.ascent(rho=0.05))
    >>> w = jnp.zeros(2)
    >>> e, state = tx.update(jnp.array([3.0, 4.0]), tx.init(w), w)  # d = g
    >>> e
    Array([0.03, 0.04], dtype=float32)

  References:
    Li et al., 2024, "Friendly Sharpness-Aware Minimization":
    https://arxiv.org/abs/2403.12350
  """
  numerics.check_range('sigma', sigma, 0.0, 1.0)
  numerics.check_range('lmbda', lmbda, 0.0, 1.0)
  if ema_dtype is not None:
    ema_dtype = jnp.dtype(ema_dtype)

  def init_fn(params):
    ema = optax.tree.zeros_like(params, dtype=ema_dtype)
    return FriendlyState(count=jnp.zeros([], jnp.int32), ema=ema)

  def update_fn(updates, state, params=None, *, mean_grads=None, **extra_args):
    del params, extra_args
    mean_grads = updates if mean_grads is None else mean_grads
    first = state.count == 0

    def direction(g, m):
      d = g - jnp.asarray(sigma, m.dtype) * m
      return jnp.where(first, g, d.astype(g.dtype))

    def moment(g_bar, m):
      m_new = jnp.asarray(lmbda, m.dtype) * m + jnp.asarray(1 - lmbda, m.dtype) * g_bar
      return jnp.where(first, g_bar.astype(m.dtype), m_new.astype(m.dtype))

    d = jax.tree.map(direction, updates, state.ema)
    ema = jax.tree.map(moment, mean_grads, state.ema)
    return d, FriendlyState(count=optax.safe_increment(state.count), ema=ema)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class VassoState(NamedTuple):
  """State of :func:`vasso_direction`.

  Attributes:
    count: number of steps taken (0 before the first).
    direction: the variance-suppressed direction ``d`` of the last step.
  """

  count: jax.Array
  direction: optax.Updates


def vasso_direction(theta: float = 0.9) -> optax.GradientTransformationExtraArgs:
  r"""VaSSO's ascent direction: an exponential moving average of the gradients.

  .. math::

    d_1 = g_1, \qquad d_t = (1 - \theta) d_{t-1} + \theta g_t.

  Chain it before :func:`ascent` to get VaSSO's perturbation
  :math:`e = \rho d / (\|d\| + \epsilon)`. Under local (per-device)
  perturbation the direction uses the member's own ``g`` and the state keeps
  the one built from the gradient averaged over devices (the extra argument
  ``mean_grads``), so that it stays identical on every device.

  Args:
    theta: the weight of the new gradient, in ``[0, 1]`` (1 gives SAM).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is
    :class:`VassoState` (one parameter-sized buffer and a step count).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax, optax_sam
    >>> tx = optax_sam.vasso_direction(theta=0.4)
    >>> w = jnp.zeros(2)
    >>> d, state = tx.update(jnp.array([1.0, 0.0]), tx.init(w), w)  # d = g
    >>> d, _ = tx.update(jnp.array([0.0, 1.0]), state, w)  # 0.6 d + 0.4 g
    >>> d
    Array([0.6, 0.4], dtype=float32)

  References:
    Li and Giannakis, 2023, "Enhancing Sharpness-Aware Optimization Through
    Variance Suppression": https://arxiv.org/abs/2309.15639
  """
  numerics.check_range('theta', theta, 0.0, 1.0)

  def init_fn(params):
    return VassoState(count=jnp.zeros([], jnp.int32), direction=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None, *, mean_grads=None, **extra_args):
    del params, extra_args
    mean_grads = updates if mean_grads is None else mean_grads
    first = state.count == 0

    def average(g, d):
      new = jnp.asarray(1 - theta, d.dtype) * d + jnp.asarray(theta, d.dtype) * g.astype(d.dtype)
      return jnp.where(first, g.astype(d.dtype), new)

    d = jax.tree.map(lambda g, d: average(g, d).astype(g.dtype), updates, state.direction)
    kept = jax.tree.map(average, mean_grads, state.direction)
    return d, VassoState(count=optax.safe_increment(state.count), direction=kept)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


AxesOrFn = Union[int, tuple[int, ...], Callable[[jax.Array], Union[int, tuple[int, ...]]]]


def centralize(g: jax.Array, output_axes: AxesOrFn = (-1,)) -> jax.Array:
  """``g`` minus its mean over every axis but the output axes; vectors and scalars unchanged.

  Flax kernels keep their output features on the last axis (``(in, out)`` for
  ``Dense``, ``(..., in, out)`` for ``Conv``), PyTorch's on the first.
  """
  if jnp.ndim(g) <= 1:
    return g
  axes = output_axes(g) if callable(output_axes) else output_axes
  keep = {a % g.ndim for a in ((axes,) if isinstance(axes, int) else axes)}
  reduced = tuple(a for a in range(g.ndim) if a not in keep)
  return g - jnp.mean(g, axis=reduced, keepdims=True)


def centralized_ascent(
  rho: ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  output_axes: AxesOrFn = (-1,),
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""GCSAM's ascent: SAM along the centralized gradient, scaled by the raw gradient's norm.

  .. math::

    e = \rho \frac{T^2 \, \mathrm{gc}(g)}{\|T g\| + \epsilon}, \qquad
    \mathrm{gc}(g) = g - \mathrm{mean}_{\text{all axes but the output axes}}(g)

  on every leaf with more than one axis (vectors are not centralized), with
  :math:`T = |w|` on every leaf when ``adaptive`` and :math:`T = 1`
  otherwise. The norm is the raw gradient's, before centralization.

  Args:
    rho: radius (``>= 0``) or a schedule of the step count.
    adaptive: scale by ``T = |w|``.
    output_axes: the output axis (or axes) of each kernel, kept when
      centralizing: an int, a tuple of ints, or a callable of the leaf
      returning one; ``(-1,)`` (the default) is Flax's ``Dense`` and ``Conv``.
      Under ``optax.inject_hyperparams`` give a tuple (a bare int would be
      injected as an array) or name it in ``static_args``.
    perturb_mask: the leaves perturbed (``None``: all; see :func:`ascent`).
    eps: added to the norm (``>= 0``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` mapping ``g`` to ``e``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> tx = optax_sam.centralized_ascent(rho=1.0)
    >>> g = {'kernel': jnp.array([[1.0, 2.0], [3.0, 6.0]])}   # (in, out)
    >>> e, _ = tx.update(g, tx.init(g), g)
    >>> e['kernel'] * 7.0710678  # gc(g) / ||g||, ||g|| = sqrt(50)
    Array([[-1., -2.],
           [ 1.,  2.]], dtype=float32)

  References:
    Hassan et al., 2025, "GCSAM: Gradient Centralized Sharpness Aware
    Minimization": https://arxiv.org/abs/2501.11584
  """
  numerics.check_range('rho', rho)
  numerics.check_range('eps', eps)
  numerics.check_flag('adaptive', adaptive)
  center = lambda g: jax.tree.map(lambda x: centralize(x, output_axes), g)
  return _ascent(
    rho, lmbda=1.0, adaptive=adaptive, perturb_mask=perturb_mask, eps=eps, direction_fn=center
  )
