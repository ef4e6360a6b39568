r"""Variational SAM: the clean gradient at a sample of a Gaussian posterior over the weights.

Bayesian SAM (bSAM, Möllenhoff & Khan, 2023) keeps a diagonal Gaussian posterior
:math:`\mathcal N(w, \mathrm{diag}(1 / (N s)))` over the weights, with :math:`N` the
number of training examples and :math:`s` a per-entry precision kept in the state.
Each step is a SAM step whose clean gradient is taken at a sample of the posterior
and whose base optimizer divides by the precision. For each *member* :math:`i` (the
whole batch, or a group of examples under :func:`optax_sam.micro_batches`, or a
device with ``local_perturbation=True``), with its own normal draw :math:`n_i`:

.. math::

  g_i = \nabla L_i\big(w + n_i / \sqrt{N s}\big), \qquad
  e_i = \mathrm{perturbation}(g_i; s), \qquad
  g_{adv, i} = \nabla L_i(w + e_i),

then, with :math:`\bar{\cdot}` the mean over the members and :math:`\delta` the
prior's precision divided by :math:`N` (a weight decay):

.. math::

  m \leftarrow \beta_1 m + (1 - \beta_1)(\bar g_{adv} + \delta w), \qquad
  w \leftarrow w - \eta\, m / s, \\
  s \leftarrow \beta_2 s + (1 - \beta_2)\big(\overline{\sqrt{s}\, |g|} + \gamma + \delta\big),

with :math:`\gamma` a damping. bSAM's perturbation is :func:`precision_ascent`,
:math:`e = \rho g / s`; any perturbation that reads the extra argument
``precision`` (or ignores it: :func:`optax_sam.ascent` gives SAM's normalized
ascent at the sampled gradient) can take its place.

The draws follow the authors' code: with ``M`` members the state's key is split
into ``M + 1`` keys, member ``i`` draws with key ``i`` (a leaf at a time, as their
``normal_like_tree``) and the last is the next step's key. Members are numbered
over devices first, then groups (device ``d``'s group ``j`` is member ``d G + j``),
so that the same groups give the same step on one device or on several.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import micro_batches as micro_batches_lib
from optax_sam._src import numerics, one_call
from optax_sam._src import state as state_lib


class PosteriorState(NamedTuple):
  """The state of :func:`variational_sam`: the posterior and the base optimizer's momentum.

  Attributes:
    count: the steps taken (int32).
    key: the PRNG key of the next step's draws (``uint32[2]``).
    momentum: :math:`m`, the moving average of the SAM gradients (with the decay).
    precision: :math:`s`, the posterior's precision per entry, before the factor :math:`N`.
    data_size: :math:`N`, so that the posterior's standard deviation :math:`1 / \\sqrt{N s}`
      can be read from the state alone (:func:`posterior_stddev`).
    perturbation: the perturbation's state.
  """

  count: jax.Array
  key: jax.Array
  momentum: optax.Updates
  precision: optax.Updates
  data_size: jax.Array
  perturbation: optax.OptState


def precision_ascent(rho: float = 0.1) -> optax.GradientTransformationExtraArgs:
  r"""bSAM's ascent: the gradient divided by the posterior's precision, unnormalized.

  .. math::

    e = \rho\, g / s,

  entry by entry, with :math:`s` the extra argument ``precision`` that
  :func:`variational_sam` passes.

  Args:
    rho: the radius (``>= 0``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` without state; its ``update``
    needs the keyword argument ``precision``.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> ascent = optax_sam.precision_ascent(rho=0.5)
    >>> g, s = jnp.array([1.0, -2.0]), jnp.array([2.0, 4.0])
    >>> ascent.update(g, ascent.init(g), None, precision=s)[0]
    Array([ 0.25, -0.25], dtype=float32)

  References:
    Möllenhoff & Khan, 2023, "SAM as an Optimal Relaxation of Bayes":
    https://arxiv.org/abs/2210.01620
  """
  numerics.check_range('rho', rho)

  def update_fn(updates, state, params=None, *, precision=None, **extra):
    del params, extra
    if precision is None:
      raise TypeError(
        'precision_ascent divides by the posterior precision: it runs inside '
        'variational_sam (optax_sam.bsam), which passes precision=s.'
      )
    e = jax.tree.map(lambda g, s: (rho * g / s).astype(jnp.result_type(g)), updates, precision)
    return e, state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _wide(tree: Any) -> Any:
  """``tree`` with its floating leaves in float32 or wider (the posterior's arithmetic)."""
  return jax.tree.map(lambda x: x.astype(numerics.accumulation_dtype(x)), tree)


def normal_like(tree: Any, key: jax.Array) -> Any:
  """Standard normal draws shaped like ``tree``, leaf ``j`` from key ``j + 1`` of ``split(key)``.

  The authors' ``normal_like_tree``: one key per leaf, in the tree's leaf order, in the
  leaves' (widened) dtype.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.wrap_key_data(key), len(leaves) + 1)[1:]
  draws = [
    jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
    for k, x in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, draws)


def stddev(precision: Any, data_size: Any) -> Any:
  """The posterior's standard deviation :math:`1 / \\sqrt{N s}`, entry by entry."""
  return jax.tree.map(lambda s: jnp.sqrt(1.0 / (data_size * s)), precision)


def _member(perturbation, params, state, grad_fn, key, before: Callable[[Any], Any]):
  """One member's ``((sqrt(s) |g|, g_adv), perturbation state)`` (``before`` averages ``g``)."""
  sigma = stddev(state.precision, state.data_size)
  noise = normal_like(params, key)
  sampled = jax.tree.map(lambda w, sd, n: w + sd * n, params, sigma, noise)
  g = _wide(grad_fn(sampled))
  one_call.check_grad_fn_output(g, params)
  g = before(g)
  e, perturbation_state = perturbation.update(
    g, state.perturbation, params, precision=state.precision
  )
  g_adv = before(_wide(grad_fn(optax.apply_updates(params, e))))
  spread = jax.tree.map(lambda s, x: jnp.sqrt(s * x**2), state.precision, g)
  return (spread, g_adv), perturbation_state


def _device(axis_name: Any, local: bool) -> tuple[Any, int]:
  """``(index, count)`` of this device among the members' devices (``(0, 1)``: one)."""
  if axis_name is None or not local:
    return 0, 1
  return jax.lax.axis_index(axis_name), jax.lax.psum(1, axis_name)


def _keys(key: jax.Array, members: int) -> jax.Array:
  return jax.random.key_data(jax.random.split(jax.random.wrap_key_data(key), members + 1))


def _mean_terms(perturbation, params, state, grad_fn, axis_name, local):
  """The members' mean ``(sqrt(s) |g|, g_adv)``, the perturbation state and the next key."""
  if isinstance(grad_fn, micro_batches_lib.MicroBatches):
    groups = jax.tree.leaves(grad_fn.groups)[0].shape[0]
    device, devices = _device(axis_name, True)
    keys = _keys(state.key, devices * groups)
    mine = jax.lax.dynamic_slice_in_dim(keys, device * groups, groups)

    def group_terms(group_and_key):
      group, key = group_and_key
      return _member(
        perturbation, params, state, lambda p: grad_fn.grad_fn(p, group), key, lambda g: g
      )

    if grad_fn.route == 'vmap':
      terms, pstate = jax.vmap(group_terms)((grad_fn.groups, mine))
      spread, g_adv = jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)
    else:  # the devices' average follows, below
      (spread, g_adv), pstate = micro_batches_lib.scan_mean(
        group_terms, (grad_fn.groups, mine), None
      )
    pstate = jax.tree.map(lambda x: x[0], pstate)  # alike in every group
    members = devices * groups
  else:
    device, members = _device(axis_name, local)
    keys = _keys(state.key, members)
    before = (lambda g: g) if local else (lambda g: one_call.average(g, axis_name))
    (spread, g_adv), pstate = _member(perturbation, params, state, grad_fn, keys[device], before)
  if local or isinstance(grad_fn, micro_batches_lib.MicroBatches):
    spread, g_adv = one_call.average((spread, g_adv), axis_name)
  return spread, g_adv, pstate, keys[members]


def variational_sam(
  perturbation: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule,
  *,
  data_size: float,
  beta1: float = 0.9,
  beta2: float = 0.999,
  weight_decay: float = 0.0,
  damping: float = 0.1,
  init_precision: float = 1.0,
  seed: int = 0,
  axis_name: Optional[Any] = None,
  local_perturbation: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """The variational step (see the module): the mechanism of :func:`optax_sam.bsam`.

  Args:
    perturbation: maps the sampled gradient to the ascent; receives ``precision``.
    learning_rate: :math:`\\eta`, a float or a schedule of the step count.
    data_size: :math:`N`, the number of training examples (``> 0``).
    beta1: the momentum's decay, in ``[0, 1]``.
    beta2: the precision's decay, in ``[0, 1]``.
    weight_decay: :math:`\\delta`, the prior's precision over :math:`N` (``>= 0``).
    damping: :math:`\\gamma`, added to the precision's update (``>= 0``).
    init_precision: :math:`s_0` (``> 0``).
    seed: the seed of the first key.
    axis_name: the data-parallel axis (``pmap``/``shard_map``) to average over.
    local_perturbation: each device samples and perturbs with its own gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, grad_fn=...)`` (``grads`` is not used: the
    clean gradient is taken at the sample; may be ``None``).
  """
  numerics.check_range('data_size', data_size, 1e-30)
  numerics.check_range('beta1', beta1, 0.0, 1.0)
  numerics.check_range('beta2', beta2, 0.0, 1.0)
  numerics.check_range('weight_decay', weight_decay)
  numerics.check_range('damping', damping)
  numerics.check_range('init_precision', init_precision, 1e-30)
  numerics.check_flag('local_perturbation', local_perturbation)
  if local_perturbation and axis_name is None:
    raise ValueError('local_perturbation=True needs axis_name (the axis of pmap or shard_map).')
  perturbation = optax.with_extra_args_support(perturbation)

  def init_fn(params):
    wide = _wide(params)
    return PosteriorState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.key_data(jax.random.key(seed)),
      momentum=optax.tree.zeros_like(wide),
      precision=jax.tree.map(lambda w: jnp.full(jnp.shape(w), init_precision, w.dtype), wide),
      data_size=jnp.asarray(data_size, jnp.float32),
      perturbation=perturbation.init(params),
    )

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra):
    del updates, extra  # the clean gradient is taken at the sample, here
    one_call.check_call(params, grad_fn)
    wide = _wide(params)
    spread, g_adv, pstate, key = _mean_terms(
      perturbation, wide, state, grad_fn, axis_name, local_perturbation
    )
    momentum = jax.tree.map(
      lambda m, g, w: beta1 * m + (1 - beta1) * (g + weight_decay * w), state.momentum, g_adv, wide
    )
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    new = jax.tree.map(lambda w, m, s: w - lr * m / s, wide, momentum, state.precision)
    precision = jax.tree.map(
      lambda s, h: beta2 * s + (1 - beta2) * (h + damping + weight_decay), state.precision, spread
    )
    updates = optax.tree.cast_like(optax.tree.sub(new, wide), params)
    count = optax.safe_increment(state.count)
    return updates, PosteriorState(count, key, momentum, precision, state.data_size, pstate)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _posterior(opt_state: optax.OptState) -> PosteriorState:
  found = state_lib.find_one(opt_state, PosteriorState, 'bSAM states')
  if found is None:
    raise ValueError(
      'no bSAM state (PosteriorState) in this optimizer state: the posterior is kept by '
      'optax_sam.bsam (or variational_sam).'
    )
  return found


def posterior_stddev(opt_state: optax.OptState) -> optax.Params:
  r"""The standard deviation :math:`1 / \sqrt{N s}` of bSAM's posterior, per weight.

  Args:
    opt_state: a state holding one :class:`PosteriorState` (of :func:`optax_sam.bsam`),
      anywhere inside (``optax.chain``, ``optax.inject_hyperparams``...).

  Returns:
    A tree of the params' structure (float32 or wider).

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> tx = optax_sam.bsam(0.1, data_size=100, init_precision=4.0)
    >>> optax_sam.posterior_stddev(tx.init(jnp.zeros(2)))  # 1 / sqrt(100 * 4)
    Array([0.05, 0.05], dtype=float32)

  References:
    Möllenhoff & Khan, 2023: https://arxiv.org/abs/2210.01620
  """
  posterior = _posterior(opt_state)
  return stddev(posterior.precision, posterior.data_size)


def posterior_samples(
  params: optax.Params, opt_state: optax.OptState, key: jax.Array, num_samples: int
) -> optax.Params:
  r"""Weights drawn from bSAM's posterior :math:`\mathcal N(w, 1 / (N s))`, for predictions.

  Averaging a model's predicted probabilities over these samples is the
  authors' Bayesian model average (their ``test.py --testmc``); the params
  themselves are the posterior's mean.

  Args:
    params: the mean (the weights bSAM trains).
    opt_state: a state holding one :class:`PosteriorState`.
    key: a PRNG key.
    num_samples: how many samples (``>= 1``).

  Returns:
    The params' structure with a leading axis of ``num_samples`` (each leaf in
    the params' dtype), e.g. for ``jax.vmap(model.apply)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_sam
    >>> tx = optax_sam.bsam(0.1, data_size=100)
    >>> w = jnp.zeros(3)
    >>> samples = optax_sam.posterior_samples(w, tx.init(w), jax.random.key(0), 1000)
    >>> samples.shape, bool(abs(samples.std() - 0.1) < 0.01)  # 1 / sqrt(100 * 1)
    ((1000, 3), True)

  References:
    Möllenhoff & Khan, 2023: https://arxiv.org/abs/2210.01620
  """
  num_samples = numerics.check_integer('num_samples', num_samples, 1)
  sigma = posterior_stddev(opt_state)
  key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)

  def one(k):
    noise = normal_like(_wide(params), jax.random.key_data(k))
    return jax.tree.map(
      lambda w, sd, n: (w + sd * n).astype(jnp.result_type(w)), params, sigma, noise
    )

  return jax.vmap(one)(jax.random.split(key, num_samples))
