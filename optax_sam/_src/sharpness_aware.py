"""The SAM wrapper: runs a perturbation, a second gradient, a correction and a base optimizer."""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import corrections, cpu_convolutions, numerics, policies
from optax_sam._src import micro_batches as micro_batches_lib
from optax_sam._src import momentum_sam as momentum_sam_lib
from optax_sam._src import statistics as statistics_lib

GradFn = Callable[[optax.Params], optax.Updates]


class SAMState(NamedTuple):
  """State of a one-call SAM transformation.

  Attributes:
    perturbation_state: state of the perturbation (e.g. F-SAM's EMA).
    base_state: state of the base optimizer.
    statistics: the last step's :class:`SAMStatistics` with
      ``statistics=True``, else an empty ``optax.EmptyState()``.
    policy_state: state of the ``when`` policy (empty without one).
    memory: what the correction keeps across steps (LookSAM's direction;
      empty for the others).
  """

  perturbation_state: optax.OptState
  base_state: optax.OptState
  statistics: Any = optax.EmptyState()
  policy_state: Any = optax.EmptyState()
  memory: Any = optax.EmptyState()


class TwoPhaseSAMState(NamedTuple):
  """State of a two-phase SAM transformation.

  Attributes:
    phase: 0 when the next call is the ascent (it receives the clean
      gradient), 1 when it is the descent (it receives the perturbed gradient).
    clean_params: the unperturbed weights, saved by the ascent call.
    prepared: what the correction needs from the clean pass (nothing, the
      clean norm for StableSAM, the clean gradient for GSAM).
    perturbation_state: state of the perturbation (e.g. F-SAM's EMA).
    base_state: state of the base optimizer.
    statistics: with ``statistics=True``, the statistics and the clean
      gradient their cosine needs; else an empty ``optax.EmptyState()``.
    policy_state: state of the ``when`` policy (empty without one).
    memory: what the correction keeps across steps (LookSAM's direction).
  """

  phase: jax.Array
  clean_params: optax.Params
  prepared: Any
  perturbation_state: optax.OptState
  base_state: optax.OptState
  statistics: Any = optax.EmptyState()
  policy_state: Any = optax.EmptyState()
  memory: Any = optax.EmptyState()


def _average(tree: Any, axis_name: Any) -> Any:
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


class _Axes(NamedTuple):
  """Where a step averages: the mapped axis (or axes), and whether each member perturbs alone.

  A member is a device under ``pmap``/``shard_map``, or a group of examples under
  :func:`micro_batches`' vmap route (then ``name`` also holds the group axis).
  """

  name: Any
  local: bool

  def mean(self, tree: Any) -> Any:
    return _average(tree, self.name)

  def before(self, tree: Any) -> Any:
    """Averaged before the perturbation (global perturbation), else as is."""
    return tree if self.local else self.mean(tree)

  def after(self, tree: Any) -> Any:
    """Averaged after the correction (local perturbation), else as is."""
    return self.mean(tree) if self.local else tree


def _with_group_axis(axis_name: Any) -> Any:
  if axis_name is None:
    return micro_batches_lib.GROUP_AXIS
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return (*names, micro_batches_lib.GROUP_AXIS)


def _widened(tree: Any, params: Any) -> Any:
  """``tree`` with the leaves of params narrower than float32 cast to float32 (others as is)."""

  def widen(x, w):
    dtype = jnp.result_type(w)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
      return x.astype(jnp.float32)
    return x

  return jax.tree.map(widen, tree, params)


def _check_grad_fn_output(g_adv: Any, grads: Any) -> None:
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


def sharpness_aware(
  base_optimizer: optax.GradientTransformation,
  perturbation: optax.GradientTransformation,
  correction: Optional[corrections.Correction] = None,
  *,
  axis_name: Optional[str] = None,
  local_perturbation: bool = False,
  two_phase: bool = False,
  statistics: bool = False,
  perturb_in_param_dtype: bool = False,
  when: Optional[policies.Policy] = None,
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
  tracking ``g``, and a ``rho`` schedule is indexed by the count of all
  updates, SAM or plain. In two-phase mode a plain step is one call (it
  receives ``g`` and returns the base update; the phase stays 0). With
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
  if correction is None:
    correction = corrections.no_correction()
  if local_perturbation and axis_name is None:
    raise ValueError('local_perturbation=True needs axis_name (the axis of pmap or shard_map).')
  base_optimizer = optax.with_extra_args_support(base_optimizer)
  perturbation = optax.with_extra_args_support(perturbation)
  device_axes = _Axes(axis_name, local_perturbation)

  def perturb(grads, state, params, axes, mean_grads=None):
    """The clean half of a step: ``(g, e, perturbation state)`` for this member."""
    if mean_grads is None:
      mean_grads = axes.mean(grads)
    g = grads if axes.local else mean_grads
    e, new_state = perturbation.update(g, state, params, mean_grads=mean_grads)
    return g, e, new_state

  def remember(memory, prepared, g_sam):
    """The correction's memory after a SAM step (``prepared`` and ``g_sam`` already averaged)."""
    if correction.remember is None:
      return memory
    return correction.remember(memory, prepared, g_sam)

  def plain_gradient(grads, mean_grads, state, params, axes):
    """A plain step's gradient ``g`` (or the correction's reuse) and its state, before the base."""
    _, _, perturbation_state = perturb(grads, state.perturbation_state, params, axes, mean_grads)
    g = mean_grads if correction.reuse is None else correction.reuse(state.memory, mean_grads)
    stats = state.statistics
    if statistics:
      values = stats.values if two_phase else stats
      values = statistics_lib.zeros(params)._replace(
        grad_norm=numerics.global_norm(mean_grads).astype(values.grad_norm.dtype)
      )
      stats = stats._replace(values=values) if two_phase else values
    new_state = state._replace(perturbation_state=perturbation_state, statistics=stats)
    return optax.tree.cast_like(g, params), new_state

  def plain_step(grads, mean_grads, state, params, extra):
    """A step without a second gradient: the base optimizer on ``g`` (or the correction's reuse)."""
    g, state = plain_gradient(grads, mean_grads, state, params, device_axes)
    updates, base_state = base_optimizer.update(g, state.base_state, params, **extra)
    return optax.tree.cast_like(updates, params), state._replace(base_state=base_state)

  def decide(mean_grads, state):
    """``(is_sam, state with the policy's next state)``; always SAM without a policy."""
    if when is None:
      return jnp.asarray(True), state
    is_sam, policy_state = when.decide(mean_grads, state.policy_state)
    return is_sam, state._replace(policy_state=policy_state)

  def init_fn(params):
    perturbation_state = perturbation.init(params)
    base_state = base_optimizer.init(params)
    policy_state = optax.EmptyState() if when is None else when.init()
    memory = correction.init_memory(params)
    if not two_phase:
      stats = statistics_lib.zeros(params) if statistics else optax.EmptyState()
      return SAMState(perturbation_state, base_state, stats, policy_state, memory)
    if statistics:
      stats = statistics_lib.TwoPhaseStatistics(
        statistics_lib.zeros(params), jax.tree.map(jnp.zeros_like, params)
      )
    else:
      stats = optax.EmptyState()
    # Built from the params' own arrays, so that the state's shardings follow theirs;
    # the copy keeps params and state from aliasing when both are donated.
    return TwoPhaseSAMState(
      phase=jnp.zeros([], jnp.int32),
      clean_params=jax.tree.map(jnp.copy, params),
      prepared=correction.init(params),
      perturbation_state=perturbation_state,
      base_state=base_state,
      statistics=stats,
      policy_state=policy_state,
      memory=memory,
    )

  # For narrow params the perturbed pass sees float32 w + e (a transient copy).
  def widen(tree, params):
    return tree if perturb_in_param_dtype else _widened(tree, params)

  def member_gradient(g, mean_grads, state, params, grad_fn, axes):
    """One member's SAM gradient before the average over members, from its clean gradient ``g``.

    ``g`` and ``mean_grads`` are already widened. Returns ``(g_sam, prepared,
    statistics, perturbation state)``.
    """
    wide_params = widen(params, params)
    e, perturbation_state = perturbation.update(
      g, state.perturbation_state, wide_params, mean_grads=mean_grads
    )
    perturbed = optax.apply_updates(wide_params, e)
    stats = state.statistics
    if statistics:
      stats = statistics_lib.before_perturbed_pass(
        g, e, params, perturbed, state.perturbation_state
      )
    g_adv = grad_fn(perturbed)
    _check_grad_fn_output(g_adv, g)
    g_adv = axes.before(g_adv)
    if statistics:
      stats = statistics_lib.after_perturbed_pass(stats, g, g_adv)
    prepared = correction.prepare(g, wide_params)
    g_sam = correction.apply(prepared, g_adv, perturbed)
    return g_sam, prepared, stats, perturbation_state

  def finish(g, state, params, extra):
    updates, base_state = base_optimizer.update(g, state.base_state, params, **extra)
    return optax.tree.cast_like(updates, params), state._replace(base_state=base_state)

  def conditional_step(is_sam, sam_gradient, plain, state, params, extra):
    """The base step on the gradient of whichever branch ``is_sam`` picks."""
    # The conditional returns only the gradient for the base optimizer and the small states: the
    # base update runs once, after it, so that its outputs can reuse the donated buffers.
    base_state = state.base_state
    # grad_fn runs inside the SAM branch, where XLA:CPU leaves convolutions in their slow order.
    sam_gradient = cpu_convolutions.canonical(sam_gradient)
    g, state = jax.lax.cond(is_sam, sam_gradient, plain, state._replace(base_state=None))
    return finish(g, state._replace(base_state=base_state), params, extra)

  def one_call_step(grads, state, params, grad_fn, extra, axes):
    """A one-call step of one member (the whole step, or a device's, or a group's share)."""
    wide_grads = widen(grads, params)

    def sam_gradient(state):
      """The SAM gradient and the state after it, all but the base optimizer's update."""
      mean_grads = axes.mean(wide_grads)
      g = wide_grads if axes.local else mean_grads
      g_sam, prepared, stats, perturbation_state = member_gradient(
        g, mean_grads, state, params, grad_fn, axes
      )
      g_sam = optax.tree.cast_like(axes.after(g_sam), params)
      new_state = state._replace(
        perturbation_state=perturbation_state,
        statistics=axes.after(stats) if statistics else stats,
        memory=remember(state.memory, axes.after(prepared), g_sam),
      )
      return g_sam, new_state

    if when is None:
      return finish(*sam_gradient(state), params, extra)
    mean_grads = axes.mean(grads)
    is_sam, state = decide(mean_grads, state)
    plain = lambda state: plain_gradient(grads, mean_grads, state, params, axes)
    return conditional_step(is_sam, sam_gradient, plain, state, params, extra)

  def vmap_route(batches, state, params, extra):
    """Micro-batches as members of a named vmap axis: the per-device code path, per group."""
    axes = _Axes(_with_group_axis(axis_name), local=True)

    def group_step(group):
      grads = batches.grad_fn(params, group)
      grad_fn = lambda p: batches.grad_fn(p, group)
      return one_call_step(grads, state, params, grad_fn, extra, axes)

    step = jax.vmap(group_step, axis_name=micro_batches_lib.GROUP_AXIS, out_axes=None)
    return step(batches.groups)

  def scan_route(batches, state, params, extra):
    """Micro-batches one after another: sums over the groups in a ``lax.scan`` carry."""
    if when is not None and when.reads_gradient:
      raise ValueError(
        "micro_batches(route='scan') decides SAM or plain before any gradient is known, so its "
        'when= policy must not read the gradient (every, after and randomly do not; ae_sam '
        "does). Use route='vmap' with this policy."
      )
    num_groups = jax.tree.leaves(batches.groups)[0].shape[0]
    keep_prepared = correction.remember is not None

    def clean_gradient(group):
      return widen(batches.grad_fn(params, group), params)

    def group_terms(group):
      """A group's clean gradient and its SAM terms (F-SAM's ``e`` needs only the group's own)."""
      g = clean_gradient(group)
      grad_fn = lambda p: batches.grad_fn(p, group)
      g_sam, prepared, stats, _ = member_gradient(g, g, state, params, grad_fn, _Axes(None, True))
      return g, g_sam, prepared if keep_prepared else optax.EmptyState(), stats

    def averaged(terms_of_group):
      """The mean over the groups (then over the devices) of a group's terms, by a scan."""
      shapes = jax.eval_shape(terms_of_group, micro_batches_lib.one_group_shape(batches.groups))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      terms = cpu_convolutions.canonical(terms_of_group)  # the group's gradients, in a scan

      def body(total, group):
        return jax.tree.map(jnp.add, total, terms(group)), None

      total, _ = jax.lax.scan(body, zeros, batches.groups)
      return _average(jax.tree.map(lambda t: t / num_groups, total), axis_name)

    def advanced(state, mean_grads):
      """The perturbation's state after a step whose averaged clean gradient is ``mean_grads``."""
      _, _, perturbation_state = perturb(
        mean_grads, state.perturbation_state, widen(params, params), _Axes(None, False), mean_grads
      )
      return perturbation_state

    def sam_gradient(state):
      mean_grads, g_sam, prepared, stats = averaged(group_terms)
      g_sam = optax.tree.cast_like(g_sam, params)
      new_state = state._replace(
        perturbation_state=advanced(state, mean_grads),
        statistics=stats,
        memory=remember(state.memory, prepared, g_sam),
      )
      return g_sam, new_state

    if when is None:
      return finish(*sam_gradient(state), params, extra)
    is_sam, state = decide(None, state)

    def plain(state):
      mean_grads = averaged(clean_gradient)
      return plain_gradient(mean_grads, mean_grads, state, params, _Axes(None, False))

    return conditional_step(is_sam, sam_gradient, plain, state, params, extra)

  def one_call_update(grads, state, params=None, *, grad_fn: Optional[GradFn] = None, **extra):
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
    if isinstance(grad_fn, micro_batches_lib.MicroBatches):
      route = vmap_route if grad_fn.route == 'vmap' else scan_route
      return route(grad_fn, state, params, extra)
    return one_call_step(grads, state, params, grad_fn, extra, device_axes)

  def two_phase_update(grads, state, params=None, **extra):
    if params is None:
      raise ValueError('SAM needs the current params: call update(grads, state, params).')
    if isinstance(extra.pop('grad_fn', None), micro_batches_lib.MicroBatches):
      raise ValueError(
        'micro_batches needs one-call mode: build the optimizer without two_phase=True (a '
        'two-phase step sees one gradient per call, not the groups).'
      )

    def ascent_call(operands):
      grads, mean_grads, state, params = operands
      g, e, perturbation_state = perturb(
        grads, state.perturbation_state, params, device_axes, mean_grads
      )
      stats = state.statistics
      if statistics:
        # The weights will hold w + e in their own dtype: measured here, from e.
        values = statistics_lib.before_perturbed_pass(
          g, e, params, optax.apply_updates(params, e), state.perturbation_state
        )
        values = device_axes.after(values)
        stats = statistics_lib.TwoPhaseStatistics(values, optax.tree.cast_like(g, params))
      new_state = state._replace(
        phase=jnp.ones_like(state.phase),
        clean_params=params,
        prepared=correction.prepare(g, params),
        perturbation_state=perturbation_state,
        statistics=stats,
      )
      return e, new_state

    def descent_call(operands):
      g_adv, state, params = operands
      g_adv = device_axes.before(g_adv)
      stats = state.statistics
      if statistics:
        values = statistics_lib.after_perturbed_pass(stats.values, stats.clean_grads, g_adv)
        stats = stats._replace(values=device_axes.after(values))
      g_sam = device_axes.after(correction.apply(state.prepared, g_adv, params))
      base_updates, base_state = base_optimizer.update(
        g_sam, state.base_state, state.clean_params, **extra
      )
      target = optax.apply_updates(state.clean_params, base_updates)
      updates = optax.tree.sub(target, params)  # lands on target from w + e
      new_state = state._replace(
        phase=jnp.zeros_like(state.phase),
        base_state=base_state,
        statistics=stats,
        memory=remember(state.memory, device_axes.after(state.prepared), g_sam),
      )
      return updates, new_state

    def clean_call(operands):
      """A call at the clean weights: the ascent, or (``when`` says so) a whole plain step."""
      grads, state, params = operands
      mean_grads = device_axes.mean(grads)
      is_sam, state = decide(mean_grads, state)
      if when is None:
        return ascent_call((grads, mean_grads, state, params))

      def plain_call(operands):
        grads, mean_grads, state, params = operands
        return plain_step(grads, mean_grads, state, params, extra)

      return jax.lax.cond(is_sam, ascent_call, plain_call, (grads, mean_grads, state, params))

    grads = optax.tree.cast_like(grads, params)
    return jax.lax.cond(state.phase == 0, clean_call, descent_call, (grads, state, params))

  update_fn = two_phase_update if two_phase else one_call_update
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _two_phase_states(state: Any) -> list:
  return [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, TwoPhaseSAMState))
    if isinstance(s, TwoPhaseSAMState)
  ]


def clean_params(params: optax.Params, state: optax.OptState) -> optax.Params:
  """The unperturbed weights, whatever phase a two-phase SAM state is in.

  Between the two calls of a two-phase step the model holds ``w + e``; this
  returns ``w`` then, and ``params`` otherwise (also for one-call states, which
  never leave the weights perturbed). A :func:`momentum_sam` state always
  holds perturbed weights: this returns its clean ``w``. ``state`` may be the
  SAM state itself or any state containing it (``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``).

  Args:
    params: the weights the model holds now.
    state: the optimizer state.

  Returns:
    The weights to evaluate or checkpoint.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> tx = optax_sam.sam(optax.sgd(0.1), rho=0.1, two_phase=True)
    >>> w = jnp.array([3.0, 4.0])
    >>> state = tx.init(w)
    >>> e, state = tx.update(w, state, w)  # ascent: w -> w + e
    >>> optax_sam.clean_params(optax.apply_updates(w, e), state)
    Array([3., 4.], dtype=float32)

  References:
    Foret et al., 2021: https://arxiv.org/abs/2010.01412
  """
  states = _two_phase_states(state)
  momentum_states = momentum_sam_lib.momentum_sam_states(state)
  if len(states) + len(momentum_states) > 1:
    raise ValueError('clean_params found more than one two-phase SAM state in the state.')
  if momentum_states:
    return momentum_sam_lib.clean_weights(params, momentum_states[0])
  if not states:
    return params
  (sam_state,) = states
  return optax.tree.where(sam_state.phase == 1, sam_state.clean_params, params)


def is_perturbed(state: optax.OptState) -> jax.Array:
  """Whether the weights currently hold ``w + e`` (a two-phase state between its two calls).

  Args:
    state: the optimizer state (or any state containing a SAM state).

  Returns:
    A boolean scalar array; always ``False`` for one-call states.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> tx = optax_sam.sam(optax.sgd(0.1), two_phase=True)
    >>> bool(optax_sam.is_perturbed(tx.init(jnp.zeros(2))))
    False

  References:
    Foret et al., 2021: https://arxiv.org/abs/2010.01412
  """
  states = _two_phase_states(state)
  if not states:
    return jnp.asarray(False)
  return states[0].phase == 1
