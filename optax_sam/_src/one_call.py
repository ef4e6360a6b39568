"""The one mechanism: a SAM step in one call, as functions over the optimizer's parts.

A step of one *member* (the whole step, a device's share under ``axis_name``,
or a group's under :func:`micro_batches`):

1. ``g``: the clean gradient (the member's own, or the average over members);
2. ``e = perturbation(g, w)``;
3. ``g_adv = grad_fn(w + e)``;
4. ``g_sam = correction(g, g_adv)``, averaged over members;
5. the base optimizer's update at the clean ``w``.

With a ``when`` policy, steps 2-4 run in the taken branch of a conditional and
the other branch gives the base optimizer ``g`` (a *plain* step). The two-phase
convention (:mod:`two_phase`) and the micro-batch routes (:mod:`micro_batches`)
reuse these functions.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import cpu_convolutions, numerics
from optax_sam._src import options as options_lib
from optax_sam._src import state as state_lib
from optax_sam._src import statistics as statistics_lib

GradFn = Callable[[optax.Params], optax.Updates]
Spec = options_lib.Spec


def average(tree: Any, axis_name: Any) -> Any:
  """The mean of ``tree`` over ``axis_name`` (``tree`` itself without an axis)."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


class Axes(NamedTuple):
  """Where a step averages: the mapped axis (or axes), and whether each member perturbs alone.

  A member is a device under ``pmap``/``shard_map``, or a group of examples under
  :func:`micro_batches`' vmap route (then ``name`` also holds the group axis).
  """

  name: Any
  local: bool

  def mean(self, tree: Any) -> Any:
    return average(tree, self.name)

  def before(self, tree: Any) -> Any:
    """Averaged before the perturbation (global perturbation), else as is."""
    return tree if self.local else self.mean(tree)

  def after(self, tree: Any) -> Any:
    """Averaged after the correction (local perturbation), else as is."""
    return self.mean(tree) if self.local else tree


def device_axes(spec: Spec) -> Axes:
  return Axes(spec.options.axis_name, spec.options.local_perturbation)


def widen(spec: Spec, tree: Any, params: Any) -> Any:
  """``tree`` with the leaves of params narrower than float32 in float32, unless opted out.

  The perturbed pass then sees the float32 ``w + e`` (a transient copy): a
  perturbation added in bfloat16 or float16 mostly rounds away.
  """
  if spec.options.perturb_in_param_dtype:
    return tree

  def widened(x, w):
    dtype = jnp.result_type(w)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      return x.astype(jnp.float32)
    return x

  return jax.tree.map(widened, tree, params)


def check_grad_fn_output(g_adv: Any, grads: Any) -> None:
  """Raises a clear error when ``grad_fn`` returns another structure or shape than ``grads``."""
  expected, got = jax.tree.structure(grads), jax.tree.structure(g_adv)
  if expected != got:
    raise TypeError(
      'grad_fn(params) must return gradients with the structure of params; '
      f'expected {expected}, got {got}. Pass grad_fn=lambda p: '
      'jax.grad(loss_fn)(p, batch), differentiating with respect to the same '
      'tree that is passed to update.'
    )
  for g, a in zip(jax.tree.leaves(grads), jax.tree.leaves(g_adv), strict=True):
    if jnp.shape(g) != jnp.shape(a):
      raise ValueError(
        f'grad_fn(params) returned a leaf of shape {jnp.shape(a)} where the '
        f'gradient has shape {jnp.shape(g)}.'
      )


def init(spec: Spec, params: optax.Params) -> state_lib.SAMState:
  """The one-call state: the parts' states, and the statistics if asked for."""
  options = spec.options
  return state_lib.SAMState(
    perturbation_state=spec.perturbation.init(params),
    base_state=spec.base.init(params),
    statistics=statistics_lib.zeros(params) if options.statistics else optax.EmptyState(),
    policy_state=optax.EmptyState() if options.when is None else options.when.init(),
    memory=spec.correction.init_memory(params),
  )


def ascend(spec: Spec, g, state, params, mean_grads):
  """``(e, perturbation state)``: the perturbation of ``g`` at ``params``.

  The perturbation also receives, as extra arguments, the members' mean gradient
  (``mean_grads``), the base optimizer's state (``base_state``: a preconditioned
  ascent reads Adam's second moment there) and the correction's memory (``memory``:
  m-ARWP's noise reads the moving average of squared perturbed gradients there).
  """
  return spec.perturbation.update(
    g,
    state.perturbation_state,
    params,
    mean_grads=mean_grads,
    base_state=state.base_state,
    memory=state.memory,
  )


def perturb(spec: Spec, grads, state, params, axes: Axes, mean_grads):
  """The clean half of a step: ``(g, e, perturbation state)`` for this member of ``state``."""
  g = grads if axes.local else mean_grads
  e, new_state = ascend(spec, g, state, params, mean_grads)
  return g, e, new_state


def remember(spec: Spec, memory, prepared, g_sam, g_adv=None):
  """The correction's memory after a SAM step (``prepared``, ``g_sam``, ``g_adv`` averaged).

  ``g_adv`` is needed (and computed by the callers) only when the correction observes it.
  """
  if spec.correction.remember is not None:
    memory = spec.correction.remember(memory, prepared, g_sam)
  if spec.correction.observe is not None:
    memory = spec.correction.observe(memory, g_adv)
  return memory


def observed(spec: Spec, g_adv):
  """``g_adv`` where the correction observes it, else ``None`` (nothing kept, nothing averaged)."""
  return None if spec.correction.observe is None else g_adv


def decide(spec: Spec, mean_grads, state):
  """``(is_sam, state with the policy's next state)``; always SAM without a policy."""
  when = spec.options.when
  if when is None:
    return jnp.asarray(True), state
  is_sam, policy_state = when.decide(mean_grads, state.policy_state)
  return is_sam, state._replace(policy_state=policy_state)


def plain_statistics(spec: Spec, stats, mean_grads, params):
  """A plain step's statistics: ``grad_norm`` and zeros elsewhere (the state's own kind)."""
  if not spec.options.statistics:
    return stats
  two_phase = spec.options.two_phase
  values = stats.values if two_phase else stats
  values = statistics_lib.zeros(params)._replace(
    grad_norm=numerics.global_norm(mean_grads).astype(values.grad_norm.dtype)
  )
  return stats._replace(values=values) if two_phase else values


def plain_gradient(spec: Spec, grads, mean_grads, state, params, axes: Axes):
  """A plain step's gradient ``g`` (or the correction's reuse) and its state, before the base.

  The perturbation still runs (its ``e`` is discarded), so that its state
  advances on every step: F-SAM's EMA keeps tracking ``g``, and a ``rho``
  schedule counts every step.
  """
  *_, perturbation_state = perturb(spec, grads, state, params, axes, mean_grads)
  reuse = spec.correction.reuse
  g = mean_grads if reuse is None else reuse(state.memory, mean_grads)
  new_state = state._replace(
    perturbation_state=perturbation_state,
    statistics=plain_statistics(spec, state.statistics, mean_grads, params),
  )
  g = optax.tree.cast_like(g, params)
  if spec.correction.outside is not None:  # a plain step adds nothing outside the base
    return (g, optax.tree.zeros_like(g)), new_state
  return g, new_state


def outside_update(spec: Spec, memory, prepared, g_adv):
  """The correction's update outside the base optimizer on a SAM step (``None`` if it has none)."""
  if spec.correction.outside is None:
    return None
  return spec.correction.outside(memory, prepared, g_adv)


def with_outside(g_sam, outside):
  """What a SAM branch hands :func:`finish`: ``g_sam``, paired with the outside update if any."""
  return g_sam if outside is None else (g_sam, outside)


def finish(spec: Spec, g, state, params, extra):
  """The base optimizer's step at the clean weights on ``g``, plus the correction's outside update.

  ``g`` is the gradient, or ``(gradient, outside update)`` for a correction with
  an ``outside`` function (:func:`with_outside`).
  """
  outside = None
  if spec.correction.outside is not None:
    g, outside = g
  updates, base_state = spec.base.update(g, state.base_state, params, **extra)
  updates = optax.tree.cast_like(updates, params)
  if outside is not None:
    updates = optax.tree.cast_like(optax.tree.add(updates, outside), params)
  return updates, state._replace(base_state=base_state)


def member_gradient(spec: Spec, g, mean_grads, state, params, grad_fn: GradFn, axes: Axes):
  """One member's SAM gradient before the average over members, from its clean gradient ``g``.

  ``g`` and ``mean_grads`` are already widened. Returns ``(g_sam, prepared,
  statistics, perturbation state, outside update or None, g_adv or None)`` (``g_adv``
  where the correction observes it).
  """
  statistics = spec.options.statistics
  wide_params = widen(spec, params, params)
  e, perturbation_state = ascend(spec, g, state, wide_params, mean_grads)
  perturbed = optax.apply_updates(wide_params, e)
  stats = state.statistics
  if statistics:
    stats = statistics_lib.before_perturbed_pass(g, e, params, perturbed, state.perturbation_state)
  g_adv = grad_fn(perturbed)
  check_grad_fn_output(g_adv, g)
  g_adv = axes.before(g_adv)
  if statistics:
    stats = statistics_lib.after_perturbed_pass(stats, g, g_adv, e)
  prepared = spec.correction.prepare(g, wide_params)
  g_sam = spec.correction.apply(prepared, g_adv, perturbed)
  outside = outside_update(spec, state.memory, prepared, g_adv)
  return g_sam, prepared, stats, perturbation_state, outside, observed(spec, g_adv)


def conditional_step(spec: Spec, is_sam, sam_gradient, plain, state, params, extra):
  """The base step on the gradient of whichever branch ``is_sam`` picks.

  The conditional returns only the gradient for the base optimizer and the
  small states: the base update runs once, after it, so that its outputs can
  reuse the donated buffers.
  """
  base_state = state.base_state
  g, state = cpu_convolutions.cond(is_sam, sam_gradient, plain, state._replace(base_state=None))
  return finish(spec, g, state._replace(base_state=base_state), params, extra)


def step(spec: Spec, grads, state, params, grad_fn: GradFn, extra, axes: Axes):
  """A one-call step of one member (the whole step, or a device's, or a group's share).

  The clean gradient is averaged over the members once, outside the
  conditional, and both branches (and the policy) read that average.
  """
  wide_grads = widen(spec, grads, params)
  mean_grads = axes.mean(wide_grads)

  def sam_gradient(state):
    """The SAM gradient and the state after it, all but the base optimizer's update."""
    g = wide_grads if axes.local else mean_grads
    g_sam, prepared, stats, perturbation_state, outside, g_adv = member_gradient(
      spec, g, mean_grads, state, params, grad_fn, axes
    )
    g_sam = optax.tree.cast_like(axes.after(g_sam), params)
    g_adv = None if g_adv is None else axes.after(g_adv)
    new_state = state._replace(
      perturbation_state=perturbation_state,
      statistics=axes.after(stats) if spec.options.statistics else stats,
      memory=remember(spec, state.memory, axes.after(prepared), g_sam, g_adv),
    )
    return with_outside(g_sam, None if outside is None else axes.after(outside)), new_state

  if spec.options.when is None:
    return finish(spec, *sam_gradient(state), params, extra)
  is_sam, state = decide(spec, mean_grads, state)
  plain = lambda state: plain_gradient(spec, grads, mean_grads, state, params, axes)
  return conditional_step(spec, is_sam, sam_gradient, plain, state, params, extra)


def check_call(params: Any, grad_fn: Optional[Any]) -> None:
  """Raises a clear error for a one-call ``update`` without params or without ``grad_fn``."""
  if params is None:
    raise ValueError(
      'SAM needs the current params: call update(grads, state, params, grad_fn=...).'
    )
  if grad_fn is None:
    raise TypeError(
      'one-call SAM needs grad_fn: update(grads, state, params, grad_fn=lambda p: '
      'jax.grad(loss_fn)(p, batch)), which returns the gradient at the weights it is '
      'given. For loops that cannot pass it, build the optimizer with two_phase=True.'
    )
