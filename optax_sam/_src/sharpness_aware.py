"""The SAM wrapper: a perturbation, a second gradient, a correction and a base optimizer.

:func:`sharpness_aware` validates the parts and the options once and returns
an ``optax.GradientTransformationExtraArgs`` whose functions run the step of
:mod:`one_call`, :mod:`two_phase` or the routes of :mod:`micro_batches`. The
aliases (:mod:`aliases`) are compositions of parts handed to :func:`compose`.
"""

import functools
from typing import Any, Optional, Unpack

import optax

from optax_sam._src import corrections, one_call
from optax_sam._src import micro_batches as micro_batches_lib
from optax_sam._src import options as options_lib
from optax_sam._src import two_phase as two_phase_lib
from optax_sam._src.state import (  # noqa: F401 - re-exported: the names' historical home
  SAMState,
  TwoPhaseSAMState,
  clean_params,
  is_perturbed,
)

GradFn = one_call.GradFn


def compose(
  base_optimizer: optax.GradientTransformation,
  perturbation: optax.GradientTransformation,
  correction: Optional[corrections.Correction],
  options: options_lib.SAMOptions,
) -> optax.GradientTransformationExtraArgs:
  """A SAM optimizer from its parts and validated options: what every alias returns."""
  spec = options_lib.make_spec(base_optimizer, perturbation, correction, options)
  if options.two_phase:
    init_fn, update_fn = two_phase_lib.init, two_phase_lib.update
  else:
    init_fn, update_fn = one_call.init, _one_call_update
  return optax.GradientTransformationExtraArgs(
    functools.partial(init_fn, spec), functools.partial(update_fn, spec)
  )


def _one_call_update(
  spec: options_lib.Spec,
  grads: optax.Updates,
  state: Any,
  params: Optional[optax.Params] = None,
  *,
  grad_fn: Optional[Any] = None,
  **extra: Any,
):
  one_call.check_call(params, grad_fn)
  if isinstance(grad_fn, micro_batches_lib.MicroBatches):
    return micro_batches_lib.run(spec, grad_fn, state, params, extra)
  return one_call.step(spec, grads, state, params, grad_fn, extra, one_call.device_axes(spec))


@options_lib.takes_options
def sharpness_aware(
  base_optimizer: optax.GradientTransformation,
  perturbation: optax.GradientTransformation,
  correction: Optional[corrections.Correction] = None,
  **options: Unpack[options_lib.OptionArguments],
) -> optax.GradientTransformationExtraArgs:
  r"""Builds a SAM-family optimizer from a perturbation, a correction and a base optimizer.

  One SAM step, with ``g`` the clean minibatch gradient at the weights ``w``:

  .. math::

    e = \mathrm{perturbation}(g, w), \quad
    g_{adv} = \nabla L_B(w + e), \quad
    g_{sam} = \mathrm{correction}(g, g_{adv}), \quad
    u = \mathrm{base}(g_{sam}, w).

  **One-call mode** (default): ``update(g, state, params, grad_fn=...)`` calls
  ``grad_fn(w + e)`` exactly once and returns the base optimizer's update at
  ``w``. **Two-phase mode** (``two_phase=True``): calls alternate; the first
  receives ``g`` and returns the update that moves ``w`` to ``w + e``, the
  second receives ``g_adv`` (the gradient at ``w + e``) and returns the update
  that lands on the base optimizer's new weights. The state says which phase
  is next (:func:`clean_params` gives the unperturbed weights).

  With ``axis_name`` (under ``pmap``/``shard_map``) ``update`` receives each
  device's gradient: by default it is averaged over the axis before the
  perturbation (global perturbation, equal to single-device SAM on the whole
  batch); with ``local_perturbation=True`` each device perturbs with its own
  gradient and applies the correction before averaging (m-sharpness). The
  perturbation receives the averaged gradient as the extra argument
  ``mean_grads``, and the base optimizer always gets the average.

  With a ``when`` policy (:func:`every`, :func:`after`, :func:`randomly`,
  :func:`ae_sam`) each step is either a SAM step or a *plain* step, chosen
  from the averaged clean gradient and the policy's state, so that every
  device chooses alike. A plain step gives the base optimizer ``g`` (or, for a
  correction with a memory such as LookSAM's, ``correction.reuse(memory, g)``)
  and does not evaluate ``grad_fn``: the branch is a ``lax.cond``, so its cost
  under ``jit`` is a base step's. The base optimizer's state carries across
  both kinds of steps. The perturbation runs on every step and its state
  advances on plain steps too (its ``e`` is discarded): F-SAM's EMA keeps
  tracking ``g``, and a ``rho`` schedule is indexed by the step count
  (every step, SAM or plain: the schedule follows the training step). In
  two-phase mode a plain step is one call (it receives ``g`` and returns the
  base update; the phase stays 0). With
  ``statistics=True`` a plain step records ``grad_norm`` and zeros elsewhere.

  With ``statistics=True`` the state also keeps the step's own statistics
  (:class:`SAMStatistics`: the two gradient norms, ``||e||``, their cosine,
  F-SAM's EMA cosine and how much of ``e`` survived rounding), read with
  :func:`step_statistics`. They cost a few reductions over quantities the step
  has anyway, and need ``g`` and ``e`` beside the perturbed pass (at most two
  parameter-sized temporaries; in two-phase mode one parameter-sized buffer in
  the state, the clean gradient); off, the state and the compiled step are
  exactly those without them.

  Args:
    base_optimizer: any optax transformation; it receives ``g_sam`` and the
      unperturbed weights, and any extra keyword arguments of ``update``.
    perturbation: a transformation mapping ``g`` to ``e`` (see :func:`ascent`,
      :func:`friendly_direction`).
    correction: a :class:`Correction` (default :func:`no_correction`).
    axis_name: the mapped axis to average gradients over, or ``None``.
    local_perturbation: perturb each device with its own gradient.
    two_phase: use alternating calls instead of ``grad_fn``.
    statistics: keep the step's statistics in the state.
    perturb_in_param_dtype: in one-call mode, hand ``grad_fn`` the perturbed
      weights in the params' own dtype. By default, for params narrower than
      float32 (bfloat16, float16) ``grad_fn`` receives float32 weights
      ``w.astype(float32) + e`` with ``e`` kept in float32, since a
      perturbation added in the narrow dtype mostly rounds away; its
      gradient is cast back before the base optimizer. Two-phase mode always
      holds ``w + e`` in the params' dtype (the statistics report the rounding).
    when: a :class:`Policy` choosing SAM steps (``None``: every step).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
    ``grad_fn`` (one-call mode) and ignores other unknown keyword arguments
    except that it forwards them to the base optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: jnp.sum(w ** 4)
    >>> tx = optax_sam.sharpness_aware(optax.sgd(0.1), optax_sam.ascent(rho=0.1))
    >>> w = jnp.array([1.0, -1.0])
    >>> state = tx.init(w)
    >>> u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    >>> optax.apply_updates(w, u)  # 1 - 0.1 * 4 (1 + 0.1 / sqrt(2))^3
    Array([ 0.509, -0.509], dtype=float32)

  References:
    Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization": https://arxiv.org/abs/2010.01412
  """
  return compose(base_optimizer, perturbation, correction, options_lib.SAMOptions(**options))
