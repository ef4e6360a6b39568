"""The public SAM-family optimizers: each a composition of a perturbation and a correction.

An alias chooses its parts and hands the wrapper options (``axis_name``,
``local_perturbation``, ``two_phase``, ``statistics``,
``perturb_in_param_dtype``, ``when``; see :func:`sharpness_aware`) on in one
line, ``SAMOptions.from_arguments(locals())``. Its hyperparameters stay
explicit keyword parameters, so that ``optax.inject_hyperparams`` can bind them.
"""

import functools
from collections.abc import Callable
from typing import Any, Optional

import optax

from optax_sam._src import adaptive as adaptive_lib
from optax_sam._src import corrections, numerics, perturbations, policies
from optax_sam._src import momentum_sam as momentum_sam_lib
from optax_sam._src import options as options_lib
from optax_sam._src import sharpness_aware as wrapper

# The wrapper options every alias takes as keywords and hands on with SAMOptions.from_arguments.
SAMOptions = options_lib.SAMOptions


def _ascent_and_correction(rho, normalize, adaptive, eta, adaptive_mask, stable, eps):
  numerics.check_flag('stable', stable)
  ascent = perturbations.ascent(
    rho, normalize=normalize, adaptive=adaptive, eta=eta, adaptive_mask=adaptive_mask, eps=eps
  )
  if stable:
    correction = corrections.stable_correction(
      adaptive=adaptive, eta=eta, adaptive_mask=adaptive_mask, eps=eps
    )
  else:
    correction = corrections.no_correction()
  return ascent, correction


def sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  *,
  normalize: bool = True,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  stable: bool = False,
  eps: float = 1e-12,
  axis_name: Optional[str] = None,
  local_perturbation: bool = False,
  two_phase: bool = False,
  statistics: bool = False,
  perturb_in_param_dtype: bool = False,
  when: Optional[policies.Policy] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization around any optax optimizer.

  .. math::

    e = \rho \frac{g}{\|g\| + \epsilon}, \qquad
    u = \mathrm{base}(\nabla L_B(w + e), w).

  ``normalize=False`` gives unnormalized SAM (USAM, :math:`e = \rho g`),
  ``adaptive=True`` ASAM's scaling (:math:`T = |w| + \eta`, every leaf unless
  ``adaptive_mask`` says otherwise, as in the davda54 code), ``stable=True``
  StableSAM's renormalization of the perturbed gradient.

  Args:
    base_optimizer: the optax optimizer that receives the SAM gradient.
    rho: perturbation radius (``>= 0``) or an optax schedule of the step count.
    normalize: divide the ascent by the gradient norm.
    adaptive: ASAM's parameter-wise scaling.
    eta: ASAM's offset (``>= 0``).
    adaptive_mask: tree of bools or callable of params selecting the scaled leaves.
    stable: StableSAM's renormalization.
    eps: added to norms in denominators (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; in one-call mode call
    ``update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = optax_sam.sam(optax.sgd(0.1), rho=0.05)
    >>> w = jnp.zeros(3)
    >>> state = tx.init(w)
    >>> for _ in range(50):
    ...   u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    ...   w = optax.apply_updates(w, u)
    >>> bool(jnp.allclose(w, 1.0, atol=0.05))
    True

  References:
    Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization": https://arxiv.org/abs/2010.01412
  """
  ascent, correction = _ascent_and_correction(
    rho, normalize, adaptive, eta, adaptive_mask, stable, eps
  )
  options = SAMOptions.from_arguments(locals())
  return wrapper.compose(base_optimizer, ascent, correction, options)


def asam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.5,
  *,
  eta: float = 0.01,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  normalize: bool = True,
  stable: bool = False,
  eps: float = 1e-12,
  axis_name: Optional[str] = None,
  local_perturbation: bool = False,
  two_phase: bool = False,
  statistics: bool = False,
  perturb_in_param_dtype: bool = False,
  when: Optional[policies.Policy] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM: SAM in the parameter-scaled space :math:`T = |w| + \eta`.

  .. math::

    e = \rho \frac{T^2 g}{\|T g\| + \epsilon}.

  By default every leaf is scaled except those named ``bias``
  (:func:`not_bias_mask`), as the official ASAM code does.

  Args:
    base_optimizer: the optax optimizer that receives the SAM gradient.
    rho: perturbation radius (``>= 0``) or a schedule; ASAM's default is 0.5.
    eta: offset in ``T`` (``>= 0``).
    adaptive_mask: selects the scaled leaves (``None``: :func:`not_bias_mask`).
    normalize: divide the ascent by ``||T g||`` (``False``: ``e = rho T^2 g``).
    stable: StableSAM's renormalization with ``T``-weighted norms.
    eps: added to norms in denominators (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (see :func:`sam`).

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros(2)}
    >>> tx = optax_sam.asam(optax.sgd(0.1))
    >>> state = tx.init(params)

  References:
    Kwon et al., 2021, "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks": https://arxiv.org/abs/2102.11600
  """
  mask = adaptive_lib.not_bias_mask if adaptive_mask is None else adaptive_mask
  ascent, correction = _ascent_and_correction(rho, normalize, True, eta, mask, stable, eps)
  options = SAMOptions.from_arguments(locals())
  return wrapper.compose(base_optimizer, ascent, correction, options)


def friendly_sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  sigma: float = 1.0,
  lmbda: float = 0.9,
  *,
  normalize: bool = True,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  stable: bool = False,
  eps: float = 1e-12,
  ema_dtype: Optional[Any] = None,
  axis_name: Optional[str] = None,
  local_perturbation: bool = False,
  two_phase: bool = False,
  statistics: bool = False,
  perturb_in_param_dtype: bool = False,
  when: Optional[policies.Policy] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM: SAM whose ascent ignores the full-gradient component.

  .. math::

    d = g - \sigma m_{t-1}, \quad m_t = \lambda m_{t-1} + (1 - \lambda) g,
    \quad e = \rho \frac{d}{\|d\| + \epsilon},

  with :math:`d = g` and :math:`m_1 = g` at the first step. The options
  ``adaptive``/``normalize``/``stable`` apply to the ascent on ``d`` as in
  :func:`sam` (StableSAM renormalizes to the clean ``g``'s norm).

  Args:
    base_optimizer: the optax optimizer that receives the SAM gradient.
    rho: perturbation radius (``>= 0``) or a schedule.
    sigma: weight of the removed EMA, in ``[0, 1]``.
    lmbda: EMA decay, in ``[0, 1]``.
    normalize: divide the ascent by the norm of ``d``.
    adaptive: ASAM's scaling of the ascent.
    eta: ASAM's offset (``>= 0``).
    adaptive_mask: selects the scaled leaves (``None``: all).
    stable: StableSAM's renormalization.
    eps: added to norms in denominators (``>= 0``).
    ema_dtype: dtype of the EMA buffer (default: the parameters' dtype).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; the state holds one
    parameter-sized EMA buffer and a step count.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = optax_sam.friendly_sam(optax.sgd(0.1), rho=0.05, sigma=1.0, lmbda=0.9)
    >>> w = jnp.zeros(3)
    >>> state = tx.init(w)
    >>> u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))

  References:
    Li et al., 2024, "Friendly Sharpness-Aware Minimization":
    https://arxiv.org/abs/2403.12350
  """
  ascent, correction = _ascent_and_correction(
    rho, normalize, adaptive, eta, adaptive_mask, stable, eps
  )
  direction = perturbations.friendly_direction(sigma, lmbda, ema_dtype=ema_dtype)
  perturbation = optax.chain(direction, ascent)
  options = SAMOptions.from_arguments(locals())
  return wrapper.compose(base_optimizer, perturbation, correction, options)


def stable_sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  *,
  normalize: bool = False,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  axis_name: Optional[str] = None,
  local_perturbation: bool = False,
  two_phase: bool = False,
  statistics: bool = False,
  perturb_in_param_dtype: bool = False,
  when: Optional[policies.Policy] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""StableSAM: unnormalized SAM whose perturbed gradient keeps the clean norm.

  .. math::

    e = \rho g, \qquad g_{sam} = g_{adv} \frac{\|g\|}{\|g_{adv}\| + \epsilon}.

  Equal to ``sam(base, rho, normalize=False, stable=True)``; ``normalize=True``
  renormalizes SAM instead of USAM.

  Args:
    base_optimizer: the optax optimizer that receives the SAM gradient.
    rho: perturbation radius (``>= 0``) or a schedule.
    normalize: use SAM's normalized ascent instead of the paper's USAM ascent.
    adaptive: ASAM's scaling, also of both norms.
    eta: ASAM's offset (``>= 0``).
    adaptive_mask: selects the scaled leaves (``None``: all).
    eps: added to norms in denominators (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; in two-phase mode its state
    carries the clean norm.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> tx = optax_sam.stable_sam(optax.sgd(0.1), rho=0.05)
    >>> w = jnp.array([1.0, -1.0])
    >>> u, _ = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))
    >>> float(jnp.linalg.norm(u))  # lr * ||g||: the clean norm is kept
    0.5656...

  References:
    Tan et al., 2024, "Stabilizing Sharpness-Aware Minimization Through A
    Simple Renormalization Strategy": https://arxiv.org/abs/2401.07250
  """
  ascent, correction = _ascent_and_correction(
    rho, normalize, adaptive, eta, adaptive_mask, True, eps
  )
  options = SAMOptions.from_arguments(locals())
  return wrapper.compose(base_optimizer, ascent, correction, options)


def gsam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  alpha: float = 0.4,
  *,
  eps: float = 1e-12,
  axis_name: Optional[str] = None,
  local_perturbation: bool = False,
  two_phase: bool = False,
  statistics: bool = False,
  perturb_in_param_dtype: bool = False,
  when: Optional[policies.Policy] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate Gap Guided SAM: SAM plus a step against the surrogate gap.

  .. math::

    e = \rho \frac{g}{\|g\| + \epsilon}, \qquad
    g_{sam} = g_{adv} - \alpha \left(g - \frac{\langle g, g_{adv}\rangle}
      {\|g_{adv}\|^2 + \epsilon} g_{adv}\right).

  Args:
    base_optimizer: the optax optimizer that receives the SAM gradient.
    rho: perturbation radius (``>= 0``) or a schedule.
    alpha: weight of the orthogonal component (``>= 0``).
    eps: added to norms in denominators (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; in two-phase mode its state
    carries the clean gradient.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> tx = optax_sam.gsam(optax.sgd(0.1), rho=0.05, alpha=0.4)
    >>> w = jnp.array([1.0, -1.0])
    >>> u, _ = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))

  References:
    Zhuang et al., 2022, "Surrogate Gap Guided Sharpness-Aware Minimization":
    https://arxiv.org/abs/2203.08065
  """
  ascent = perturbations.ascent(rho, eps=eps)
  correction = corrections.gsam_correction(alpha, eps=eps)
  options = SAMOptions.from_arguments(locals())
  return wrapper.compose(base_optimizer, ascent, correction, options)


def look_sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.1,
  alpha: float = 0.7,
  k: int = 5,
  *,
  eps: float = 1e-12,
  axis_name: Optional[str] = None,
  local_perturbation: bool = False,
  two_phase: bool = False,
  statistics: bool = False,
  perturb_in_param_dtype: bool = False,
  when: Optional[policies.Policy] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: a SAM step every ``k`` steps, its extra direction reused in between.

  On steps ``0, k, 2k, ...`` a SAM step (:math:`e = \rho g / (\|g\| + \epsilon)`)
  that also stores the unit component of ``g_adv`` orthogonal to ``g``,

  .. math::

    v = g_{adv} - \frac{\langle g_{adv}, g\rangle}{\|g\|^2 + \epsilon} g,
    \qquad \hat v = v / \|v\|;

  on the other steps the base optimizer gets :math:`g + \alpha \|g\| \hat v`
  and ``grad_fn`` is not evaluated (:func:`look_sam_correction` with
  ``when=every(k)``). ``k = 1`` is SAM; ``alpha = 0`` is :func:`sam` with
  ``when=every(k)``. Its state holds one parameter-sized buffer.

  Args:
    base_optimizer: the optax optimizer that receives the gradients.
    rho: perturbation radius (``>= 0``) or a schedule.
    alpha: weight of the reused direction (``>= 0``).
    k: the period of SAM steps (an integer ``>= 1``).
    eps: added to norms in denominators (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).
      For LookSAM the default ``when=None`` is ``every(k)``; another policy
      replaces it (``ae_sam`` gives the AE-LookSAM of Jiang et al. 2023),
      and ``k`` is then unused.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (see :func:`sam`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> tx = optax_sam.look_sam(optax.sgd(0.1), rho=0.1, alpha=0.7, k=5)
    >>> w = jnp.array([1.0, -1.0])
    >>> state = tx.init(w)
    >>> for _ in range(3):
    ...   u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    ...   w = optax.apply_updates(w, u)

  References:
    Liu et al., 2022, "Towards Efficient and Scalable Sharpness-Aware
    Minimization": https://arxiv.org/abs/2203.02714
  """
  policy = policies.every(k) if when is None else when
  ascent = perturbations.ascent(rho, eps=eps)
  correction = corrections.look_sam_correction(alpha, eps=eps)
  options = SAMOptions.from_arguments(locals(), when=policy)
  return wrapper.compose(base_optimizer, ascent, correction, options)


# The named variants, by the short names of the example's --optimizer (and of the benchmarks and
# the tests' variant table, tests/helpers.py): a new alias adds its row here, and
# tests/test_architecture.py checks that the tests, the benchmarks and the example know it.
VARIANTS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
  'sam': sam,
  'usam': functools.partial(sam, normalize=False),
  'asam': asam,
  'fsam': friendly_sam,
  'stablesam': stable_sam,
  'gsam': gsam,
  'looksam': look_sam,
  'msam': momentum_sam_lib.momentum_sam,
}
