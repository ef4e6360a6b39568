"""The two-phase calling convention: a SAM step as two calls of ``update``, over the same parts.

For loops that can only do "gradient, update, apply". The first call receives
the clean gradient ``g`` and returns the update that moves ``w`` to ``w + e``;
the second receives ``g_adv``, the gradient at ``w + e``, and returns the
update that lands on the base optimizer's new weights. The state
(:class:`TwoPhaseSAMState`) says which phase is next and carries what the
second call needs. With a ``when`` policy a plain step is one call.
"""

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import micro_batches as micro_batches_lib
from optax_sam._src import one_call
from optax_sam._src import state as state_lib
from optax_sam._src import statistics as statistics_lib

Spec = one_call.Spec


def init(spec: Spec, params: optax.Params) -> state_lib.TwoPhaseSAMState:
  """The two-phase state: the clean weights, the correction's prepared value, the parts' states."""
  first = one_call.init(spec, params)
  stats = first.statistics
  if spec.options.statistics:
    stats = statistics_lib.TwoPhaseStatistics(stats, jax.tree.map(jnp.zeros_like, params))
  # Built from the params' own arrays, so that the state's shardings follow theirs;
  # the copy keeps params and state from aliasing when both are donated.
  return state_lib.TwoPhaseSAMState(
    phase=jnp.zeros([], jnp.int32),
    clean_params=jax.tree.map(jnp.copy, params),
    prepared=spec.correction.init(params),
    perturbation_state=first.perturbation_state,
    base_state=first.base_state,
    statistics=stats,
    policy_state=first.policy_state,
    memory=first.memory,
  )


def _ascent_call(spec: Spec, grads, mean_grads, state, params):
  """The first call: ``e`` as the update (``w -> w + e``), and what the second call needs."""
  axes = one_call.device_axes(spec)
  g, e, perturbation_state = one_call.perturb(spec, grads, state, params, axes, mean_grads)
  stats = state.statistics
  if spec.options.statistics:
    # The weights will hold w + e in their own dtype: measured here, from e.
    values = statistics_lib.before_perturbed_pass(
      g, e, params, optax.apply_updates(params, e), state.perturbation_state
    )
    stats = statistics_lib.TwoPhaseStatistics(axes.after(values), optax.tree.cast_like(g, params))
  new_state = state._replace(
    phase=jnp.ones_like(state.phase),
    clean_params=params,
    prepared=spec.correction.prepare(g, params),
    perturbation_state=perturbation_state,
    statistics=stats,
  )
  return e, new_state


def _descent_call(spec: Spec, g_adv, state, params, extra):
  """The second call: from ``w + e`` to the base optimizer's new weights."""
  axes = one_call.device_axes(spec)
  g_adv = axes.before(g_adv)
  stats = state.statistics
  if spec.options.statistics:
    e = optax.tree.sub(params, state.clean_params)  # the perturbation the weights hold
    values = statistics_lib.after_perturbed_pass(stats.values, stats.clean_grads, g_adv, e)
    stats = stats._replace(values=axes.after(values))
  g_sam = axes.after(spec.correction.apply(state.prepared, g_adv, params))
  base_updates, base_state = spec.base.update(g_sam, state.base_state, state.clean_params, **extra)
  outside = one_call.outside_update(spec, state.memory, state.prepared, g_adv)
  if outside is not None:
    base_updates = optax.tree.add(base_updates, optax.tree.cast_like(axes.after(outside), params))
  target = optax.apply_updates(state.clean_params, base_updates)
  updates = optax.tree.sub(target, params)  # lands on target from w + e
  new_state = state._replace(
    phase=jnp.zeros_like(state.phase),
    base_state=base_state,
    statistics=stats,
    memory=one_call.remember(
      spec,
      state.memory,
      axes.after(state.prepared),
      g_sam,
      None if spec.correction.observe is None else axes.after(g_adv),
    ),
  )
  return updates, new_state


def _plain_call(spec: Spec, grads, mean_grads, state, params, extra):
  """A whole plain step in one call (a ``when`` policy chose it): the base optimizer on ``g``."""
  axes = one_call.device_axes(spec)
  g, state = one_call.plain_gradient(spec, grads, mean_grads, state, params, axes)
  return one_call.finish(spec, g, state, params, extra)


def _clean_call(spec: Spec, grads, state, params, extra):
  """A call at the clean weights: the ascent, or (``when`` says so) a whole plain step."""
  mean_grads = one_call.device_axes(spec).mean(grads)
  is_sam, state = one_call.decide(spec, mean_grads, state)
  ascent = lambda operands: _ascent_call(spec, *operands)
  if spec.options.when is None:
    return ascent((grads, mean_grads, state, params))
  plain = lambda operands: _plain_call(spec, *operands, extra)
  return jax.lax.cond(is_sam, ascent, plain, (grads, mean_grads, state, params))


def update(spec: Spec, grads, state, params=None, **extra):
  """One call of a two-phase step: the ascent (phase 0) or the descent (phase 1)."""
  if params is None:
    raise ValueError('SAM needs the current params: call update(grads, state, params).')
  grad_fn = extra.pop('grad_fn', None)
  if isinstance(grad_fn, micro_batches_lib.MicroBatches):
    raise ValueError(
      'micro_batches needs one-call mode: build the optimizer without two_phase=True (a '
      'two-phase step sees one gradient per call, not the groups).'
    )
  if grad_fn is not None:
    raise TypeError(
      'a two-phase SAM optimizer takes no grad_fn: its calls alternate, the first receiving '
      'the clean gradient and returning the move to w + e, the second the gradient at w + e. '
      'To pass grad_fn, use one-call mode (build the optimizer without two_phase=True).'
    )
  grads = optax.tree.cast_like(grads, params)
  clean = lambda operands: _clean_call(spec, *operands, extra)
  descent = lambda operands: _descent_call(spec, *operands, extra)
  return jax.lax.cond(state.phase == 0, clean, descent, (grads, state, params))
