"""Micro-batches: m-sharpness on one device, and SAM with gradient accumulation.

A SAM step's batch split into groups of ``m`` examples, each perturbed with its
own gradient (m-sharpness), is what ``local_perturbation=True`` does with one
group per device. :func:`micro_batches` makes the groups explicit, so that
``m`` alone sets the result whatever the number of devices; :func:`run` takes
a SAM step over them by one of two routes (see :func:`micro_batches`).
:func:`accumulated_grad_fn` averages a gradient over micro-batches for SAM
with one perturbation for the whole batch.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import cpu_convolutions, numerics, one_call

# The vmap route's axis: the SAM wrapper averages over it (and over its own axis_name).
GROUP_AXIS = 'optax_sam_micro_batches'
ROUTES = ('scan', 'vmap')

BatchGradFn = Callable[[optax.Params, Any], optax.Updates]


class MicroBatches(NamedTuple):
  """A batch split into groups, and the gradient of one group; pass it as ``grad_fn``.

  Attributes:
    grad_fn: ``grad_fn(params, group) -> grads``, the gradient of the loss of
      one group of examples.
    groups: the batch with its leading axis split into ``[num_groups,
      group_size]``.
    route: ``'scan'`` (groups one after another, memory independent of their
      number) or ``'vmap'`` (groups side by side on a named axis).
  """

  grad_fn: BatchGradFn
  groups: Any
  route: str


def _leading_size(batch: Any, what: str) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(f'{what} needs a batch with at least one array.')
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      f'{what} splits the leading axis of every array of the batch, so they must all have '
      f'one, of the same size; got leading sizes {sorted(map(str, sizes))}.'
    )
  return sizes.pop()


def _split(batch: Any, size: int, name: str, what: str) -> Any:
  numerics.check_integer(name, size, 1)
  total = _leading_size(batch, what)
  if total % size:
    raise ValueError(
      f'{name}={size} must divide the batch size {total} (got {total % size} examples left '
      f'over); choose a {name} that divides it, or drop the remainder from the batch.'
    )
  return jax.tree.map(lambda x: _grouped(x, total // size, size), batch)


def _grouped(x: Any, num_groups: int, size: int) -> jax.Array:
  """``x`` reshaped to ``[num_groups, size, ...]``.

  A batch sharded over an explicit mesh axis keeps that sharding within each
  group (the group axis replicated; the whole group replicated when ``size`` is
  not a multiple of the axis size): a scan cannot step along a sharded axis.
  """
  shape = (num_groups, size, *jnp.shape(x)[1:])
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = getattr(sharding, 'spec', None)
  if not spec or spec[0] is None or not _is_explicit(sharding.mesh, spec[0]):
    return jnp.reshape(x, shape)
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  devices = math.prod(sharding.mesh.shape[name] for name in names)
  within = spec[0] if size % devices == 0 else None
  P = jax.sharding.PartitionSpec
  if within is None:  # gather the batch first: no reshape splits a sharded axis unevenly
    x = jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, P(None, *spec[1:])))
  target = jax.sharding.NamedSharding(sharding.mesh, P(None, within, *spec[1:]))
  return jax.lax.reshape(x, shape, out_sharding=target)


def _is_explicit(mesh: Any, names: Any) -> bool:
  names = names if isinstance(names, tuple) else (names,)
  types = dict(zip(mesh.axis_names, getattr(mesh, 'axis_types', ()), strict=False))
  return any(types.get(name) == jax.sharding.AxisType.Explicit for name in names)


def one_group_shape(groups: Any) -> Any:
  """The shapes and dtypes of one group of ``groups`` (for ``jax.eval_shape``)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), groups)


def micro_batches(
  grad_fn: BatchGradFn, batch: Any, group_size: int, *, route: str = 'scan'
) -> MicroBatches:
  r"""Splits a batch into groups of ``group_size`` examples for an m-sharpness SAM step.

  Passed as ``grad_fn`` to the ``update`` of any one-call SAM transformation
  (every alias, :func:`sharpness_aware`), it makes the step perturb each group
  :math:`B_j` (of :math:`m` examples) with its own clean gradient, the
  ``local_perturbation=True`` semantics with groups for devices:

  .. math::

    g_j = \nabla L_{B_j}(w), \quad e_j = \mathrm{perturbation}(g_j), \quad
    g_{sam} = \frac{1}{G} \sum_{j=1}^{G}
      \mathrm{correction}(g_j, \nabla L_{B_j}(w + e_j)),

  and the base optimizer receives :math:`g_{sam}`. The step computes the clean
  gradients itself, so ``update``'s gradient argument is not used (pass
  ``None``), and transformations chained *before* the SAM one do not see the
  groups' gradients (put them in the base optimizer instead). State that
  follows the averaged gradient (F-SAM's EMA, the ``when`` policy's choice)
  sees :math:`\frac{1}{G}\sum_j g_j`. Under ``shard_map`` or ``pmap`` with the
  transformation's ``axis_name``, each device's batch is split the same way and
  the average runs over all groups of all devices, so ``group_size`` alone sets
  the result: 8 devices with ``local_perturbation=True``, 1 device with 8
  groups and 2 devices with 4 groups each take the same step. Within a group,
  the model sees the group alone (a BatchNorm layer in train mode normalizes
  with the group's statistics, as on a device holding ``m`` examples).

  Two routes compute the same step, to float tolerance:

  * ``'scan'`` runs the groups one after another in a ``lax.scan``, keeping
    running sums: its memory does not grow with the number of groups. It needs
    the perturbation's ``e`` to depend only on the group's gradient and the
    state (true of :func:`ascent` and :func:`friendly_direction`), and a
    ``when`` policy that decides without the gradient (not :func:`ae_sam`).
  * ``'vmap'`` maps the groups over a named axis and runs the per-device code
    path on it, all groups at once (memory grows with their number).

  Args:
    grad_fn: ``grad_fn(params, group) -> grads`` for a group of examples (e.g.
      ``jax.grad(loss_fn)`` with ``loss_fn(params, batch)``).
    batch: a pytree of arrays sharing a leading batch axis of size ``B``.
    group_size: ``m``, an integer ``>= 1`` dividing ``B``.
    route: ``'scan'`` or ``'vmap'``.

  Returns:
    A :class:`MicroBatches` holding the ``B / m`` groups.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w, batch: jnp.mean((batch @ w - 1.0) ** 2)
    >>> batch = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> tx = optax_sam.sam(optax.sgd(0.1), rho=0.1)
    >>> w = jnp.zeros(2)
    >>> groups = optax_sam.micro_batches(jax.grad(loss), batch, group_size=1)
    >>> u, state = tx.update(None, tx.init(w), w, grad_fn=groups)
    >>> u  # -0.1 x the mean of ([-2.2, 0], [0, -4.8]), each example perturbed alone
    Array([0.11, 0.24], dtype=float32)

  References:
    Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization" (m-sharpness): https://arxiv.org/abs/2010.01412;
    Andriushchenko and Flammarion, 2022, "Towards Understanding
    Sharpness-Aware Minimization": https://arxiv.org/abs/2206.06232
  """
  if route not in ROUTES:
    raise ValueError(f'route must be one of {ROUTES}, got {route!r}.')
  return MicroBatches(grad_fn, _split(batch, group_size, 'group_size', 'micro_batches'), route)


def accumulated_grad_fn(
  grad_fn: BatchGradFn, batch: Any, micro_batch_size: int
) -> Callable[[optax.Params], optax.Updates]:
  r"""The gradient over a whole batch, accumulated over its micro-batches in a ``lax.scan``.

  .. math::

    \nabla L_B(w) = \frac{1}{K} \sum_{k=1}^{K} \nabla L_{B_k}(w)

  for a loss that is a mean over examples and ``K`` micro-batches of equal
  size. Use it for both of a SAM step's gradients to get SAM with one
  perturbation for the whole batch (equal to SAM on the batch at once) while
  holding one micro-batch's activations at a time:

  .. code-block:: python

    acc = optax_sam.accumulated_grad_fn(jax.grad(loss_fn), batch, micro_batch_size)
    updates, state = tx.update(acc(params), state, params, grad_fn=acc)

  For one perturbation per micro-batch (m-sharpness with ``m`` the micro-batch
  size) use :func:`micro_batches` with ``route='scan'`` instead.

  Args:
    grad_fn: ``grad_fn(params, micro_batch) -> grads``.
    batch: a pytree of arrays sharing a leading batch axis.
    micro_batch_size: examples per micro-batch, an integer ``>= 1`` dividing
      the batch size.

  Returns:
    ``grad_fn(params) -> grads``, the mean of the micro-batches' gradients
    (accumulated in float32 or wider, returned in the gradients' dtype).

  Example:
    >>> import jax, jax.numpy as jnp, optax_sam
    >>> loss = lambda w, batch: jnp.mean((batch @ w) ** 2)
    >>> batch = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> acc = optax_sam.accumulated_grad_fn(jax.grad(loss), batch, micro_batch_size=1)
    >>> acc(jnp.ones(2))  # = jax.grad(loss)(w, batch)
    Array([1., 4.], dtype=float32)

  References:
    Foret et al., 2021: https://arxiv.org/abs/2010.01412
  """
  groups = _split(batch, micro_batch_size, 'micro_batch_size', 'accumulated_grad_fn')
  count = jax.tree.leaves(groups)[0].shape[0]

  def accumulated(params):
    shapes = jax.eval_shape(grad_fn, params, one_group_shape(groups))
    zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes
    )

    def body(total, micro_batch):
      return optax.tree.add(total, grad_fn(params, micro_batch)), None

    total, _ = cpu_convolutions.scan(body, zeros, groups)
    return jax.tree.map(lambda t, s: (t / count).astype(s.dtype), total, shapes)

  return accumulated


# ----------------------------------------------------------------------------------- the routes


def run(spec: one_call.Spec, batches: MicroBatches, state, params, extra):
  """A one-call SAM step over the groups of ``batches``, by their route."""
  route = _vmap_route if batches.route == 'vmap' else _scan_route
  return route(spec, batches, state, params, extra)


def _with_group_axis(axis_name: Any) -> Any:
  if axis_name is None:
    return GROUP_AXIS
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return (*names, GROUP_AXIS)


def _vmap_route(spec: one_call.Spec, batches: MicroBatches, state, params, extra):
  """Groups as members of a named vmap axis: the per-device code path, per group."""
  axes = one_call.Axes(_with_group_axis(spec.options.axis_name), local=True)

  def group_step(group):
    grads = batches.grad_fn(params, group)
    grad_fn = lambda p: batches.grad_fn(p, group)
    return one_call.step(spec, grads, state, params, grad_fn, extra, axes)

  return jax.vmap(group_step, axis_name=GROUP_AXIS, out_axes=None)(batches.groups)


def _check_scan_policy(spec: one_call.Spec) -> None:
  when = spec.options.when
  if when is not None and when.reads_gradient:
    raise ValueError(
      "micro_batches(route='scan') decides SAM or plain before any gradient is known, so its "
      'when= policy must not read the gradient (every, after and randomly do not; ae_sam '
      "does). Use route='vmap' with this policy."
    )


def scan_mean(terms_of_group: Callable[[Any], tuple[Any, Any]], groups: Any, axis_name: Any) -> Any:
  """The mean over ``groups``' leading axis (then over ``axis_name``) of a group's terms, by a scan.

  ``terms_of_group(group) -> (terms, aux)``: the terms are summed in the scan's carry (the
  group's user code runs through the CPU convolution seam), the ``aux`` outputs are stacked.

  Returns:
    ``(mean of the terms, stacked aux)``.
  """
  num_groups = jax.tree.leaves(groups)[0].shape[0]
  shapes, _ = jax.eval_shape(terms_of_group, one_group_shape(groups))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(total, group):
    terms, aux = terms_of_group(group)
    return jax.tree.map(jnp.add, total, terms), aux

  total, aux = cpu_convolutions.scan(body, zeros, groups)
  return one_call.average(jax.tree.map(lambda t: t / num_groups, total), axis_name), aux


def _scan_mean(spec: one_call.Spec, batches: MicroBatches, terms_of_group) -> Any:
  """The mean over the groups (then over the devices) of a group's terms (:func:`scan_mean`)."""
  with_no_aux = lambda group: (terms_of_group(group), None)
  return scan_mean(with_no_aux, batches.groups, spec.options.axis_name)[0]


def _scan_route(spec: one_call.Spec, batches: MicroBatches, state, params, extra):
  """Groups one after another: sums over the groups in a ``lax.scan`` carry."""
  _check_scan_policy(spec)
  keep_prepared = spec.correction.remember is not None
  alone, averaged = one_call.Axes(None, True), one_call.Axes(None, False)

  def clean_gradient(group):
    return one_call.widen(spec, batches.grad_fn(params, group), params)

  def group_terms(group):
    """A group's clean gradient and its SAM terms (F-SAM's ``e`` needs only the group's own)."""
    g = clean_gradient(group)
    grad_fn = lambda p: batches.grad_fn(p, group)
    g_sam, prepared, stats, _, outside, g_adv = one_call.member_gradient(
      spec, g, g, state, params, grad_fn, alone
    )
    outside = optax.EmptyState() if outside is None else outside
    g_adv = optax.EmptyState() if g_adv is None else g_adv
    return g, g_sam, prepared if keep_prepared else optax.EmptyState(), stats, outside, g_adv

  def sam_gradient(state):
    mean_grads, g_sam, prepared, stats, outside, g_adv = _scan_mean(spec, batches, group_terms)
    g_sam = optax.tree.cast_like(g_sam, params)
    # The perturbation's state advances as after a step whose clean gradient is the mean.
    wide_params = one_call.widen(spec, params, params)
    *_, perturbation_state = one_call.perturb(
      spec, mean_grads, state, wide_params, averaged, mean_grads
    )
    new_state = state._replace(
      perturbation_state=perturbation_state,
      statistics=stats,
      memory=one_call.remember(spec, state.memory, prepared, g_sam, g_adv),
    )
    if spec.correction.outside is None:
      return g_sam, new_state
    return one_call.with_outside(g_sam, optax.tree.cast_like(outside, params)), new_state

  if spec.options.when is None:
    return one_call.finish(spec, *sam_gradient(state), params, extra)
  is_sam, state = one_call.decide(spec, None, state)

  def plain(state):
    mean_grads = _scan_mean(spec, batches, clean_gradient)
    return one_call.plain_gradient(spec, mean_grads, mean_grads, state, params, averaged)

  return one_call.conditional_step(spec, is_sam, sam_gradient, plain, state, params, extra)
