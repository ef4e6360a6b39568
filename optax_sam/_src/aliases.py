"""The public SAM-family optimizers: each a composition of a perturbation and a correction.

An alias chooses its parts and hands the wrapper options (``axis_name``,
``local_perturbation``, ``two_phase``, ``statistics``,
``perturb_in_param_dtype``, ``when``; see :func:`sharpness_aware`) on in one
line, ``SAMOptions(**options)``. Its hyperparameters are explicit keyword
parameters, and ``@takes_options`` spells the six options out in its signature,
so that ``optax.inject_hyperparams`` (and ``help``) see every parameter.
"""

import functools
from collections.abc import Callable
from typing import Any, Optional, Unpack

import optax

from optax_sam._src import adaptive as adaptive_lib
from optax_sam._src import (
  corrections,
  cycles,
  numerics,
  parallel,
  perturbations,
  policies,
  preconditioning,
  random_weights,
  variational,
)
from optax_sam._src import momentum_sam as momentum_sam_lib
from optax_sam._src import options as options_lib
from optax_sam._src import sharpness_aware as wrapper

# The wrapper options every alias takes as keywords (``**options``) and hands on.
SAMOptions = options_lib.SAMOptions


def _ascent_and_correction(rho, *, normalize, stable, eps, **geometry):
  """SAM's ascent (:func:`ascent`) and, with ``stable``, StableSAM's correction.

  ``geometry`` is ``adaptive``, ``eta``, ``adaptive_mask`` and ``perturb_mask``, as :func:`ascent`
  takes them; StableSAM's two norms use the same scaling ``T``, over every leaf.
  """
  numerics.check_flag('stable', stable)
  ascent = perturbations.ascent(rho, normalize=normalize, **geometry, eps=eps)
  if not stable:
    return ascent, corrections.no_correction()
  del geometry['perturb_mask']
  return ascent, corrections.stable_correction(**geometry, eps=eps)


@options_lib.takes_options
def sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  *,
  normalize: bool = True,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  stable: bool = False,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
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
    perturb_mask: selects the perturbed leaves (``None``: all; SAM-ON: the normalization layers).
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
  geometry = dict(
    adaptive=adaptive, eta=eta, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask
  )
  ascent, correction = _ascent_and_correction(
    rho, normalize=normalize, stable=stable, eps=eps, **geometry
  )
  return wrapper.compose(base_optimizer, ascent, correction, SAMOptions(**options))


@options_lib.takes_options
def asam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.5,
  *,
  eta: float = 0.01,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  normalize: bool = True,
  stable: bool = False,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
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
    perturb_mask: selects the perturbed leaves (``None``: all; SAM-ON: the normalization layers).
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
  geometry = dict(adaptive=True, eta=eta, adaptive_mask=mask, perturb_mask=perturb_mask)
  ascent, correction = _ascent_and_correction(
    rho, normalize=normalize, stable=stable, eps=eps, **geometry
  )
  return wrapper.compose(base_optimizer, ascent, correction, SAMOptions(**options))


@options_lib.takes_options
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
  perturb_mask: adaptive_lib.MaskOrFn = None,
  stable: bool = False,
  eps: float = 1e-12,
  ema_dtype: Optional[Any] = None,
  **options: Unpack[options_lib.OptionArguments],
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
    eta, adaptive_mask, perturb_mask: ASAM's offset, the scaled and the perturbed leaves, as in
      :func:`sam`.
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
  geometry = dict(
    adaptive=adaptive, eta=eta, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask
  )
  ascent, correction = _ascent_and_correction(
    rho, normalize=normalize, stable=stable, eps=eps, **geometry
  )
  direction = perturbations.friendly_direction(sigma, lmbda, ema_dtype=ema_dtype)
  perturbation = optax.chain(direction, ascent)
  return wrapper.compose(base_optimizer, perturbation, correction, SAMOptions(**options))


@options_lib.takes_options
def stable_sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  *,
  normalize: bool = False,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
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
    eta, adaptive_mask, perturb_mask: ASAM's offset, the scaled and the perturbed leaves, as in
      :func:`sam`.
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
  geometry = dict(
    adaptive=adaptive, eta=eta, adaptive_mask=adaptive_mask, perturb_mask=perturb_mask
  )
  ascent, correction = _ascent_and_correction(
    rho, normalize=normalize, stable=True, eps=eps, **geometry
  )
  return wrapper.compose(base_optimizer, ascent, correction, SAMOptions(**options))


@options_lib.takes_options
def gsam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  alpha: float = 0.4,
  *,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
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
    perturb_mask: selects the perturbed leaves (``None``: all; SAM-ON: the normalization layers).
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
  ascent = perturbations.ascent(rho, perturb_mask=perturb_mask, eps=eps)
  correction = corrections.gsam_correction(alpha, eps=eps)
  return wrapper.compose(base_optimizer, ascent, correction, SAMOptions(**options))


@options_lib.takes_options
def look_sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.1,
  alpha: float = 0.7,
  k: int = 5,
  *,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
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
    perturb_mask: selects the perturbed leaves (``None``: all; SAM-ON: the normalization layers).
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
  ascent = perturbations.ascent(rho, perturb_mask=perturb_mask, eps=eps)
  correction = corrections.look_sam_correction(alpha, eps=eps)
  if options.get('when') is None:
    options['when'] = policies.every(k)
  options = SAMOptions(**options)
  return wrapper.compose(base_optimizer, ascent, correction, options)


@options_lib.takes_options
def wsam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  gamma: float = 0.9,
  *,
  learning_rate: Any = None,
  decouple: bool = True,
  max_norm: Optional[float] = None,
  adaptive: bool = False,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM: the sharpness term weighted by :math:`\alpha = \gamma / (1 - \gamma)`.

  .. math::

    e = \rho \frac{g}{\|g\| + \epsilon}, \qquad
    u = \mathrm{base}(g) - \eta_t \alpha (g_{adv} - g) \quad (\text{decouple}),
    \qquad u = \mathrm{base}(g + \alpha (g_{adv} - g)) \quad (\text{coupled}).

  Decoupled (the default, as the official code), the sharpness term is applied
  outside the base optimizer with the learning rate :math:`\eta_t` you pass
  (no momentum, no weight decay on it): :func:`decoupled_correction`. Coupled,
  the base optimizer gets the weighted sum: :func:`mixed_correction`.
  ``gamma = 0.5`` coupled is SAM's step on ``g_adv``.

  Args:
    base_optimizer: the optax optimizer that receives ``g`` (decoupled) or the
      weighted gradient (coupled).
    rho: perturbation radius (``>= 0``) or a schedule.
    gamma: the sharpness weight, in ``[0, 1)``; :math:`\alpha = \gamma / (1 - \gamma)`.
    learning_rate: required with ``decouple=True``: the learning rate of the
      sharpness term (usually the base optimizer's), a number or an optax
      schedule of the SAM-step count.
    decouple: apply the sharpness term outside the base optimizer.
    max_norm: clip ``g`` and ``g_adv`` (each) to this global norm after the
      perturbation is computed from the unclipped ``g`` (``None``: no clipping).
    adaptive: ASAM's scaling with :math:`T = |w|` on every leaf (no ``eta``), as
      the official code.
    perturb_mask: selects the perturbed leaves (``None``: all; SAM-ON: the normalization layers).
    eps: added to the norm in the ascent (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (see :func:`sam`).

  Raises:
    ValueError: ``decouple=True`` without ``learning_rate``, or a bad value.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> tx = optax_sam.wsam(optax.sgd(0.1, momentum=0.9), rho=0.05, gamma=0.9, learning_rate=0.1)
    >>> w = jnp.array([1.0, -1.0])
    >>> u, _ = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))

  References:
    Yue et al., 2023, "Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term": https://arxiv.org/abs/2305.15817
  """
  numerics.check_range('gamma', gamma, 0.0, 1.0)
  numerics.check_flag('decouple', decouple)
  if numerics.is_concrete(gamma) and float(gamma) == 1.0:
    raise ValueError('gamma must be below 1 (alpha = gamma / (1 - gamma)), got 1.0.')
  if decouple and learning_rate is None:
    raise ValueError(
      'wsam(decouple=True) needs learning_rate, the learning rate of the decoupled sharpness '
      "term (usually the base optimizer's: a number or a schedule); or pass decouple=False."
    )
  alpha = gamma / (1 - gamma)
  ascent = perturbations.ascent(rho, adaptive=adaptive, perturb_mask=perturb_mask, eps=eps)
  if decouple:
    correction = corrections.decoupled_correction(alpha, learning_rate, max_norm=max_norm)
  else:
    correction = corrections.mixed_correction(alpha, max_norm=max_norm)
  return wrapper.compose(base_optimizer, ascent, correction, SAMOptions(**options))


@options_lib.takes_options
def vasso(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  theta: float = 0.9,
  *,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-7,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""VaSSO: SAM along a moving average of the gradients, suppressing their variance.

  .. math::

    d_t = (1 - \theta) d_{t-1} + \theta g_t \;(d_1 = g_1), \qquad
    e = \rho \frac{d_t}{\|d_t\| + \epsilon}.

  ``theta = 1`` is SAM. The composition of :func:`vasso_direction` and
  :func:`ascent`.

  Args:
    base_optimizer: the optax optimizer that receives the SAM gradient.
    rho: perturbation radius (``>= 0``) or a schedule.
    theta: the weight of the new gradient in ``d``, in ``[0, 1]``.
    adaptive: ASAM's scaling of the ascent.
    eta, adaptive_mask, perturb_mask: ASAM's offset, the scaled and the perturbed leaves, as in
      :func:`sam`.
    eps: added to the norm (``>= 0``; the official code's 1e-7).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; the state holds ``d`` (one
    parameter-sized buffer) and a step count.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> tx = optax_sam.vasso(optax.sgd(0.1), rho=0.05, theta=0.4)
    >>> w = jnp.array([1.0, -1.0])
    >>> u, _ = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))

  References:
    Li and Giannakis, 2023, "Enhancing Sharpness-Aware Optimization Through
    Variance Suppression": https://arxiv.org/abs/2309.15639
  """
  direction = perturbations.vasso_direction(theta)
  ascent = perturbations.ascent(
    rho,
    adaptive=adaptive,
    eta=eta,
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
    eps=eps,
  )
  perturbation = optax.chain(direction, ascent)
  options = SAMOptions(**options)
  return wrapper.compose(base_optimizer, perturbation, corrections.no_correction(), options)


@options_lib.takes_options
def gcsam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  output_axes: perturbations.AxesOrFn = (-1,),
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""GCSAM: SAM whose ascent follows the centralized gradient.

  .. math::

    e = \rho \frac{T^2 \mathrm{gc}(g)}{\|T g\| + \epsilon},

  with :math:`\mathrm{gc}` removing from each kernel its mean over every axis
  but the output axis (:func:`centralized_ascent`); the perturbed gradient
  is not centralized. :math:`T = |w|` with ``adaptive``, else 1.

  Args:
    base_optimizer: the optax optimizer that receives the SAM gradient.
    rho: perturbation radius (``>= 0``) or a schedule.
    adaptive: ASAM's scaling with :math:`T = |w|` on every leaf.
    output_axes: each kernel's output axis or axes (``(-1,)``: Flax's
      ``Dense`` and ``Conv``; PyTorch's is 0), or a callable of the leaf
      returning them; a tuple under ``optax.inject_hyperparams``.
    perturb_mask: selects the perturbed leaves (``None``: all; SAM-ON: the normalization layers).
    eps: added to the norm (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (see :func:`sam`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w['kernel'] ** 4)
    >>> tx = optax_sam.gcsam(optax.sgd(0.1), rho=0.05)
    >>> w = {'kernel': jnp.array([[1.0, -1.0], [0.5, 2.0]])}
    >>> u, _ = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))

  References:
    Hassan et al., 2025, "GCSAM: Gradient Centralized Sharpness Aware
    Minimization": https://arxiv.org/abs/2501.11584
  """
  ascent = perturbations.centralized_ascent(
    rho, adaptive=adaptive, output_axes=output_axes, perturb_mask=perturb_mask, eps=eps
  )
  return wrapper.compose(base_optimizer, ascent, corrections.no_correction(), SAMOptions(**options))


@options_lib.takes_options
def unified_sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.1,
  lmbda: perturbations.ScalarOrSchedule = 1.0,
  *,
  adaptive: bool = False,
  eta: float = 0.0,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""Unified SAM: a convex combination of SAM's and USAM's ascents.

  .. math::

    e = \rho \left(1 - \lambda + \frac{\lambda}{\|g\| + \epsilon}\right) g.

  ``lmbda = 1`` is SAM, ``0`` USAM; ``lmbda`` may be a schedule of the step
  count (the paper's :math:`1 - 1/t`: ``lambda c: 1 - 1 / (c + 1)``). The
  ascent is :func:`unified_ascent`.

  Args:
    base_optimizer: the optax optimizer that receives the SAM gradient.
    rho: perturbation radius (``>= 0``) or a schedule.
    lmbda: the weight of the normalized ascent, in ``[0, 1]``, or a schedule.
    adaptive: ASAM's scaling of the ascent.
    eta, adaptive_mask, perturb_mask: ASAM's offset, the scaled and the perturbed leaves, as in
      :func:`sam`.
    eps: added to the norm (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (see :func:`sam`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> tx = optax_sam.unified_sam(optax.sgd(0.1), rho=0.1, lmbda=0.5)
    >>> w = jnp.array([1.0, -1.0])
    >>> u, _ = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))

  References:
    Oikonomou and Loizou, 2025, "Sharpness-Aware Minimization: General
    Analysis and Improved Rates": https://arxiv.org/abs/2503.02225
  """
  ascent = perturbations.unified_ascent(
    rho,
    lmbda,
    adaptive=adaptive,
    eta=eta,
    adaptive_mask=adaptive_mask,
    perturb_mask=perturb_mask,
    eps=eps,
  )
  return wrapper.compose(base_optimizer, ascent, corrections.no_correction(), SAMOptions(**options))


@options_lib.takes_options
def lookbehind_sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  k: int = 5,
  alpha: Optional[float] = 0.5,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
  adaptive_mask: adaptive_lib.MaskOrFn = None,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-16,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""Lookbehind-SAM: ``k`` accumulated ascents and descents per step, then a step back.

  One ``update`` is one cycle from the slow weights :math:`s` (the weights the
  model holds): :math:`a_0 = \phi_0 = s`; for :math:`j = 1..k`,

  .. math::

    a_j = a_{j-1} + \rho \frac{T^2 g_j}{\|T g_j\| + \epsilon}, \quad
    g_{j+1} = \nabla L(a_j), \quad
    \phi_j = \phi_{j-1} + \mathrm{base}(g_{j+1}, \phi_{j-1}),

  with :math:`g_1` the clean gradient passed to ``update`` (the ascents
  accumulate: each starts where the last one ended); then
  :math:`s' = \alpha \phi_k + (1 - \alpha) s`. ``grad_fn`` is called ``k``
  times, on the same batch. ``alpha=None`` chooses it per leaf,
  :math:`(\cos(\phi_1 - s, \phi_k - s) + 1) / 2` (the official
  ``alpha=-1``). The base optimizer sees ``k`` updates per call: its schedules
  and step counts advance ``k`` times per ``update``. Built from
  :func:`ascent` and the cycle of inner steps (``optax_sam._src.cycles``).

  Args:
    base_optimizer: the optimizer of the fast weights :math:`\phi`.
    rho: the radius of each ascent (``>= 0``) or a schedule of the inner-step count.
    k: inner steps per update (an integer ``>= 1``).
    alpha: the weight of the fast weights, in ``[0, 1]``, or ``None`` (adaptive).
    adaptive: ASAM's ascent, :math:`T = |a| + \eta` (the official LookbehindASAM).
    eta: ASAM's offset (``>= 0``; used with ``adaptive``).
    adaptive_mask: the leaves scaled by ``T`` (``None``: all but biases,
      :func:`not_bias_mask`, as the official code).
    perturb_mask: selects the perturbed leaves (``None``: all; SAM-ON: the normalization layers).
    eps: added to the norm (``>= 0``; the official 1e-16).
    axis_name, local_perturbation: as in :func:`sharpness_aware`.
    two_phase, statistics, perturb_in_param_dtype, when: not available for this step shape
      (a cycle needs ``grad_fn`` ``k`` times in one call); ``True``/a policy raises.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, grad_fn=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = optax_sam.lookbehind_sam(optax.sgd(0.1), rho=0.05, k=2, alpha=0.5)
    >>> w = jnp.zeros(2)
    >>> u, state = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))

  References:
    Mordido et al., 2024, "Lookbehind-SAM: k steps back, 1 step forward":
    https://arxiv.org/abs/2307.16704
  """
  options = SAMOptions(**options)
  options.check_supported(
    'lookbehind_sam',
    ('axis_name', 'local_perturbation'),
    'it runs k inner steps in one update with grad_fn (no second call, no plain steps).',
  )
  mask = adaptive_lib.not_bias_mask if adaptive_mask is None else adaptive_mask
  ascent = perturbations.ascent(
    rho, adaptive=adaptive, eta=eta, adaptive_mask=mask, perturb_mask=perturb_mask, eps=eps
  )
  return cycles.cycle(
    base_optimizer,
    ascent,
    cycles.interpolate(alpha),
    k=k,
    axis_name=options.axis_name,
    local_perturbation=options.local_perturbation,
  )


@options_lib.takes_options
def preconditioned_sam(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.05,
  *,
  precondition_eps: float = 1e-8,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditioned SAM: the ascent in the base optimizer's (Adam's) geometry.

  .. math::

    d = \frac{g}{\sqrt{\nu} + \epsilon_p}, \qquad
    e = \rho \frac{d}{\|d\| + \epsilon}, \qquad
    u = \mathrm{base}(\nabla L_B(w + e), w),

  with :math:`\nu` the base optimizer's second moment before the step (Adam's,
  not bias-corrected). The base optimizer must hold one Adam state
  (``optax.adam``, ``optax.adamw``, a chain with ``optax.scale_by_adam``).
  Combine it with Functional-SAM's ``grad_fn``
  (:func:`functional_value_and_grad`) for the paper's preconditioned
  Functional-SAM. Built from :func:`preconditioned_direction` and
  :func:`ascent`.

  Args:
    base_optimizer: an optax optimizer with Adam's second moment.
    rho: perturbation radius (``>= 0``) or a schedule of the step count.
    precondition_eps: added to :math:`\sqrt{\nu}` (``> 0``).
    perturb_mask: selects the perturbed leaves (``None``: all).
    eps: added to the norm (``>= 0``).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (see :func:`sam`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(jnp.array([1.0, 100.0]) * w ** 2)
    >>> tx = optax_sam.preconditioned_sam(optax.adamw(0.01), rho=0.05)
    >>> w = jnp.ones(2)
    >>> state = tx.init(w)
    >>> u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))

  References:
    Singh et al., 2025, "Avoiding spurious sharpness minimization broadens
    applicability of SAM": https://arxiv.org/abs/2502.02407
  """
  direction = preconditioning.preconditioned_direction(precondition_eps)
  ascent = perturbations.ascent(rho, perturb_mask=perturb_mask, eps=eps)
  perturbation = optax.chain(direction, ascent)
  options = SAMOptions(**options)
  return wrapper.compose(base_optimizer, perturbation, corrections.no_correction(), options)


@options_lib.takes_options
def mrwp(
  base_optimizer: optax.GradientTransformation,
  sigma: perturbations.ScalarOrSchedule = 0.01,
  lmbda: float = 0.5,
  *,
  seed: int = 0,
  output_axes: tuple = (-1,),
  perturb_mask: adaptive_lib.MaskOrFn = None,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""m-RWP: random weight perturbation, the two gradients mixed.

  .. math::

    e_i \sim \mathcal{N}\big(0, (\sigma \|W_i\|)^2\big), \qquad
    u = \mathrm{base}\big((1 - \lambda) g + \lambda \nabla L_B(w + e), w\big),

  with :math:`W_i` each output filter of a kernel (a vector leaf: the whole
  vector, its norm plus :math:`10^{-16}`). The noise does not depend on
  :math:`g`, so the two gradients may come from different batches (the
  official loop takes them on two consecutive batches) and may run side by
  side. Built from :func:`random_perturbation` and :func:`mixed_correction`.

  Args:
    base_optimizer: the optax optimizer that receives the mixed gradient.
    sigma: the noise's scale relative to each filter's norm (``>= 0``) or a schedule.
    lmbda: the weight of the perturbed gradient, in ``[0, 1]``.
    seed: the seed of the noise's first key (the key is in the state).
    output_axes: the axes of a kernel indexing its filters (``(-1,)``: Flax; PyTorch ``(0,)``).
    perturb_mask: selects the perturbed leaves (``None``: all).
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (see :func:`sam`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum((w['kernel'] - 1.0) ** 2)
    >>> tx = optax_sam.mrwp(optax.sgd(0.1), sigma=0.01, lmbda=0.5)
    >>> w = {'kernel': jnp.zeros((3, 2))}
    >>> state = tx.init(w)
    >>> u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))

  References:
    Li et al., 2024, "Revisiting Random Weight Perturbation for Efficiently
    Improving Generalization": https://arxiv.org/abs/2404.00357
  """
  numerics.check_range('lmbda', lmbda, 0.0, 1.0)
  noise = random_weights.random_perturbation(
    sigma, seed=seed, output_axes=output_axes, perturb_mask=perturb_mask
  )
  correction = corrections.mixed_correction(lmbda)
  return wrapper.compose(base_optimizer, noise, correction, SAMOptions(**options))


@options_lib.takes_options
def marwp(
  base_optimizer: optax.GradientTransformation,
  sigma: perturbations.ScalarOrSchedule = 0.01,
  lmbda: float = 0.5,
  *,
  eta: float = 1.0,
  beta: float = 0.9,
  seed: int = 0,
  output_axes: tuple = (-1,),
  perturb_mask: adaptive_lib.MaskOrFn = None,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""m-ARWP: random weight perturbation shrunk where the perturbed gradients are large.

  .. math::

    e_i \sim \mathcal{N}\Big(0, \frac{(\sigma \|W_i\|)^2}{1 + \eta F_i}\Big), \qquad
    u = \mathrm{base}\big((1 - \lambda) g + \lambda g_{adv}, w\big), \qquad
    F \leftarrow \beta F + g_{adv}^2,

  with :math:`g_{adv} = \nabla L_B(w + e)`, :math:`W_i` each output filter of a
  kernel and :math:`F_i` the sum of :math:`F` over it (a vector leaf: the whole
  vector's norm, each entry's own :math:`F`), :math:`F_0 = 0`. :func:`mrwp`
  with the noise adapted to the perturbed gradients of the steps before. Built
  from :func:`random_perturbation` (``eta``) and :func:`arwp_correction`, whose
  memory holds :math:`F` (a float32 copy of the parameters' size).

  Args:
    base_optimizer: the optax optimizer that receives the mixed gradient.
    sigma: the noise's scale relative to each filter's norm (``>= 0``) or a schedule.
    lmbda: the weight of the perturbed gradient, in ``[0, 1]``.
    eta: the weight of :math:`F` in the noise's scale (``>= 0``; 0 is :func:`mrwp`).
    beta: the decay of :math:`F`, in ``[0, 1]``.
    seed, output_axes, perturb_mask: as in :func:`mrwp`.
    axis_name, local_perturbation, two_phase, statistics, perturb_in_param_dtype, when: the
      wrapper's options, the same for every alias (see :func:`sharpness_aware`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (see :func:`sam`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum((w['kernel'] - 1.0) ** 2)
    >>> tx = optax_sam.marwp(optax.sgd(0.1), sigma=0.01, lmbda=0.5, eta=1.0, beta=0.9)
    >>> w = {'kernel': jnp.zeros((3, 2))}
    >>> state = tx.init(w)
    >>> u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    >>> state.memory.fisher['kernel'].shape  # F, after one step: g_adv ** 2
    (3, 2)

  References:
    Li et al., 2024, "Revisiting Random Weight Perturbation for Efficiently
    Improving Generalization": https://arxiv.org/abs/2404.00357 (official
    code: nblt/mARWP ``train_marwp.py``)
  """
  noise = random_weights.random_perturbation(
    sigma, seed=seed, output_axes=output_axes, perturb_mask=perturb_mask, eta=eta
  )
  correction = random_weights.arwp_correction(lmbda, beta=beta)
  return wrapper.compose(base_optimizer, noise, correction, SAMOptions(**options))


@options_lib.takes_options
def sampa(
  base_optimizer: optax.GradientTransformation,
  rho: perturbations.ScalarOrSchedule = 0.1,
  lmbda: float = 0.2,
  *,
  perturb_mask: adaptive_lib.MaskOrFn = None,
  eps: float = 1e-12,
  pair_axis_name: Optional[str] = None,
  pair_route: str = 'vmap',
  pair_sharding: Optional[Any] = None,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""SAMPa: SAM whose two gradients run in parallel, the ascent following the last auxiliary one.

  With :math:`d_t` the gradient at the auxiliary point of the step before
  (:math:`d_0 = 0`),

  .. math::

    \tilde x_t = x_t + \rho \frac{d_t}{\|d_t\| + \epsilon}, \qquad
    y_{t+1} = x_t + \mathrm{base}(d_t, x_t), \\
    x_{t+1} = x_t + \mathrm{base}\big((1 - \lambda) \nabla L(\tilde x_t)
      + \lambda \nabla L(y_{t+1}),\ x_t\big), \qquad d_{t+1} = \nabla L(y_{t+1}),

  where the auxiliary step :math:`\mathrm{base}(d_t, x_t)` is the base
  optimizer's update with :math:`d_t` from its current state (momentum and
  weight decay included) without committing it, and is zero at the first step
  (as in the official loop). The two gradients do not depend on each other:
  ``grad_fn`` is evaluated once on the two points stacked (``jax.vmap``), or
  one point per device over ``pair_axis_name``, or one after the other with
  ``pair_route='sequential'``. ``update``'s gradient argument is not used (pass
  ``None``). Built from :func:`ascent` and the parallel step
  (``optax_sam._src.parallel``).

  The official code takes :math:`\nabla L(\tilde x_t)` on the *previous*
  batch (the one :math:`d_t` came from, as in the paper's algorithm) and
  :math:`\nabla L(y_{t+1})` on the current one: pass
  ``grad_fn=optax_sam.batch_pair(grad, previous_batch, batch)`` for that (the
  first step: the batch twice); a plain ``grad_fn(params)`` takes both on its
  own batch.

  Args:
    base_optimizer: the optax optimizer of the weights (and of the auxiliary step).
    rho: perturbation radius (``>= 0``) or a schedule of the step count.
    lmbda: the weight of the auxiliary gradient, in ``[0, 1]`` (the official ``--og``).
    perturb_mask: selects the perturbed leaves (``None``: all).
    eps: added to :math:`\|d\|` (``>= 0``).
    pair_axis_name: a ``shard_map``/``pmap`` axis of size 2 over which the two
      gradients are split, one per device.
    pair_route: ``'vmap'`` (both gradients in one batched program) or
      ``'sequential'`` (one after the other: half the activation memory).
    pair_sharding: with ``'vmap'`` under ``jit``, a sharding of the stacked pair
      (e.g. ``NamedSharding(mesh, P('pair'))``: one gradient per device).
    axis_name: average both gradients over this data-parallel axis.
    local_perturbation, two_phase, statistics, perturb_in_param_dtype, when:
      not available for this step shape (both gradients are taken in one call,
      every step); setting one raises.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(None, state, params, grad_fn=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = optax_sam.sampa(optax.sgd(0.1), rho=0.1, lmbda=0.2)
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> for _ in range(50):
    ...   u, state = tx.update(None, state, w, grad_fn=jax.grad(loss))
    ...   w = optax.apply_updates(w, u)
    >>> bool(jnp.allclose(w, 1.0, atol=0.01))
    True

  References:
    Xie et al., 2024, "SAMPa: Sharpness-aware Minimization Parallelized":
    https://arxiv.org/abs/2410.10683
  """
  options = SAMOptions(**options)
  options.check_supported(
    'sampa',
    ('axis_name',),
    'both gradients are taken in one update, every step (give grad_fn).',
  )
  ascent = perturbations.ascent(rho, perturb_mask=perturb_mask, eps=eps)
  return parallel.parallel_sam(
    base_optimizer,
    ascent,
    lmbda=lmbda,
    axis_name=options.axis_name,
    pair_axis_name=pair_axis_name,
    pair_route=pair_route,
    pair_sharding=pair_sharding,
  )


@options_lib.takes_options
def bsam(
  learning_rate: optax.ScalarOrSchedule,
  rho: float = 0.1,
  beta1: float = 0.9,
  beta2: float = 0.999,
  *,
  data_size: float,
  prior_precision: float = 25.0,
  damping: float = 0.1,
  init_precision: float = 1.0,
  seed: int = 0,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""Bayesian SAM: SAM's step on a Gaussian posterior over the weights, its precision learned.

  With :math:`s` the posterior's precision per weight (its variance
  :math:`1 / (N s)`, :math:`N` = ``data_size``), :math:`\delta` =
  ``prior_precision / data_size`` and a normal draw :math:`n`:

  .. math::

    g = \nabla L\big(w + n / \sqrt{N s}\big), \quad
    g_{adv} = \nabla L(w + \rho\, g / s), \\
    m \leftarrow \beta_1 m + (1 - \beta_1)(g_{adv} + \delta w), \quad
    w \leftarrow w - \eta\, m / s, \quad
    s \leftarrow \beta_2 s + (1 - \beta_2)\big(\sqrt{s}\,|g| + \gamma + \delta\big).

  It is its own optimizer (no base optimizer: the step divides by the
  precision, as an Adam whose second moment is the posterior's). With
  :func:`micro_batches` each group draws its own sample and perturbs with its
  own gradient, the authors' ``--batchsplit`` (their CIFAR runs use 8 groups).
  The clean gradient is taken here, at the sample: ``update``'s gradient
  argument is not used. Built from :func:`precision_ascent` and the variational
  step (``optax_sam._src.variational``); :func:`posterior_samples` draws
  weights for predictions (Bayesian model averaging) and
  :func:`posterior_stddev` reads the variance.

  Defaults are those of the authors' ``train.py``; their CIFAR-10 runs use
  ``learning_rate=0.5, rho=0.01, prior_precision=40`` with
  ``data_size = 4 x 50000`` (``--dafactor 4`` for data augmentation).

  Args:
    learning_rate: :math:`\eta`, a float or a schedule of the step count.
    rho: the radius of the ascent :math:`\rho g / s` (``>= 0``).
    beta1: the momentum's decay, in ``[0, 1]``.
    beta2: the precision's decay, in ``[0, 1]``.
    data_size: :math:`N`, the number of training examples (scaled up for data
      augmentation, as the authors' ``--dafactor``).
    prior_precision: the Gaussian prior's precision; :math:`\delta` is it over
      :math:`N` (a weight decay on the mean and a floor on the precision).
    damping: :math:`\gamma`, added to the precision's update.
    init_precision: :math:`s_0`.
    seed: the seed of the draws' first key (kept in the state).
    axis_name: average over this data-parallel axis (one sample for all
      devices; with ``local_perturbation=True`` one per device, as groups).
    local_perturbation: each device samples and perturbs with its own gradient.
    two_phase, statistics, perturb_in_param_dtype, when: not available for this
      step shape (the clean gradient is taken at a sample drawn inside the
      step, every step); setting one raises.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose
    ``update(None, state, params, grad_fn=...)`` takes both gradients itself.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> quadratic = lambda w: 0.5 * jnp.sum((w - 1.0) ** 2)
    >>> tx = optax_sam.bsam(0.1, rho=0.01, data_size=1000)
    >>> w, state = jnp.zeros(2), tx.init(jnp.zeros(2))
    >>> step = jax.jit(lambda w, s: tx.update(None, s, w, grad_fn=jax.grad(quadratic)))
    >>> for _ in range(300):
    ...   u, state = step(w, state)
    ...   w = optax.apply_updates(w, u)
    >>> bool(jnp.allclose(w, 1.0, atol=0.05)), optax_sam.posterior_stddev(state).shape
    (True, (2,))

  References:
    Möllenhoff & Khan, 2023, "SAM as an Optimal Relaxation of Bayes":
    https://arxiv.org/abs/2210.01620
  """
  options = SAMOptions(**options)
  options.check_supported(
    'bsam',
    ('axis_name', 'local_perturbation'),
    'the clean gradient is taken at a sample drawn inside each update (give grad_fn).',
  )
  numerics.check_range('data_size', data_size, 1e-30)
  numerics.check_range('prior_precision', prior_precision)
  return variational.variational_sam(
    variational.precision_ascent(rho),
    learning_rate,
    data_size=data_size,
    beta1=beta1,
    beta2=beta2,
    weight_decay=prior_precision / data_size,
    damping=damping,
    init_precision=init_precision,
    seed=seed,
    axis_name=options.axis_name,
    local_perturbation=options.local_perturbation,
  )


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
  'wsam': wsam,
  'vasso': vasso,
  'gcsam': gcsam,
  'unifiedsam': unified_sam,
  'lookbehind': lookbehind_sam,
  'sampa': sampa,
  'mrwp': mrwp,  # its radius is sigma, the noise's scale relative to each filter's norm
  'marwp': marwp,  # the same radius, sigma
}
# Not named here: preconditioned_sam needs an Adam base optimizer (the example and the benchmarks
# train with SGD); tests/helpers.py runs it around AdamW.
