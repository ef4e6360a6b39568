"""Perturbations: ordinary Optax transformations that turn the clean gradient into ``e``.

A perturbation maps the clean minibatch gradient ``g`` (and the weights ``w``)
to the ascent vector ``e``; the SAM wrapper then evaluates the gradient at
``w + e``. Perturbations chain with ``optax.chain``: F-SAM is
``optax.chain(friendly_direction(...), ascent(...))``.
"""

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import adaptive as adaptive_lib
from optax_sam._src import numerics

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


class AscentState(NamedTuple):
  """State of :func:`ascent` when ``rho`` is a schedule.

  Attributes:
    count: the step count: steps taken so far, each SAM step once (both of
      its two-phase calls together) and, under ``when=``, each plain step too.
  """

  count: jax.Array


def ascent(
  rho: ScalarOrSchedule = 0.05,
  *,
  normalize: bool = True,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""The SAM family's ascent step: maps a gradient ``g`` to the perturbation ``e``.

  .. math::

    e = \rho \frac{T^2 g}{\|T g\| + \epsilon} \quad (\text{normalize}), \qquad
    e = \rho \, T^2 g \quad (\text{not normalize}),

  with :math:`T = |w| + \eta` on the leaves ``adaptive_mask`` selects and
  :math:`T = 1` elsewhere when ``adaptive``, and :math:`T = 1` otherwise. This
  gives SAM (Foret et al.), unnormalized SAM and ASAM (Kwon et al.). The norm
  is computed in float32 or wider; a zero gradient gives ``e = 0``.

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
    Andriushchenko and Flammarion, 2022: https://arxiv.org/abs/2206.06232 (USAM)
  """
  numerics.check_range('rho', rho)
  numerics.check_range('eta', eta)
  numerics.check_range('eps', eps)
  numerics.check_flag('normalize', normalize)
  numerics.check_flag('adaptive', adaptive)
  scheduled = callable(rho)

  def init_fn(params):
    del params
    if scheduled:
      return AscentState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if adaptive and params is None:
      raise ValueError('ascent(adaptive=True) needs params: call update(g, state, params).')
    if scheduled:
      radius = rho(state.count)
      new_state = AscentState(count=optax.safe_increment(state.count))
    else:
      radius, new_state = rho, state
    dtype = numerics.accumulation_dtype(updates)
    radius = jnp.asarray(radius, dtype)
    if adaptive:
      t = adaptive_lib.adaptive_scale(params, eta, adaptive_mask)
      direction = adaptive_lib.scaled(updates, t, power=2)
      norm = numerics.global_norm(adaptive_lib.scaled(updates, t))
    else:
      direction = updates
      norm = numerics.global_norm(updates)
    if normalize:
      radius = numerics.safe_ratio(radius, norm + jnp.asarray(eps, norm.dtype))
    e = jax.tree.map(lambda d, g: (d * radius).astype(jnp.result_type(g)), direction, updates)
    return e, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
