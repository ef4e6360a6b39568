"""``when=`` policies: which steps are SAM steps and which are plain base-optimizer steps.

A :class:`Policy` is two pure functions over a fixed-structure state of arrays:
``init()`` and ``decide(grads, state) -> (is_sam_step, state)``. The SAM
wrapper calls ``decide`` once per step with the clean gradient (averaged over
devices under ``axis_name``, so that every device decides alike) and branches
with ``lax.cond``: a plain step never evaluates ``grad_fn``.
"""

from typing import Any, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import numerics


class InitFn(Protocol):
  """``init() -> state``: a policy's initial state, a fixed-structure tree of arrays."""

  def __call__(self) -> Any: ...


class DecideFn(Protocol):
  """``decide(grads, state) -> (is_sam, state)``: this step's choice and the next state.

  ``grads`` is the clean gradient, averaged over devices (``None`` where the
  policy decides before any gradient is known, for a policy with
  ``reads_gradient=False``); ``is_sam`` is a boolean scalar array.
  """

  def __call__(self, grads: Optional[optax.Updates], state: Any) -> tuple[jax.Array, Any]: ...


class Policy(NamedTuple):
  """A per-step choice between a SAM step and a plain step.

  Attributes:
    init: ``init() -> state``: the initial state (arrays only).
    decide: ``decide(grads, state) -> (is_sam, state)``: a boolean scalar
      array for this step, and the next state.
    reads_gradient: whether ``decide`` looks at ``grads``. A policy that does
      not (``every``, ``after``, ``randomly``) can decide before any gradient
      is known, which the ``scan`` route of :func:`micro_batches` needs.
  """

  init: InitFn
  decide: DecideFn
  reads_gradient: bool = True


class CountState(NamedTuple):
  """State of :func:`every` and :func:`after`.

  Attributes:
    count: number of steps decided so far.
  """

  count: jax.Array


class RandomState(NamedTuple):
  """State of :func:`randomly`.

  Attributes:
    count: number of steps decided so far.
    key: the raw PRNG key (``uint32[2]``) the seed gives; step ``t`` draws
      from ``fold_in(key, t)``.
  """

  count: jax.Array
  key: jax.Array


class AESAMState(NamedTuple):
  """State of :func:`ae_sam`.

  Attributes:
    count: number of steps decided so far.
    mean: EMA of the squared clean-gradient norm.
    var: EMA of its squared deviation from ``mean``.
  """

  count: jax.Array
  mean: jax.Array
  var: jax.Array


def _zero_count() -> jax.Array:
  return jnp.zeros([], jnp.int32)


def every(k: int) -> Policy:
  r"""SAM on steps ``0, k, 2k, ...`` (counted from the first update), plain steps between.

  ``every(1)`` is SAM on every step. Over ``N`` steps it takes
  :math:`\lceil N / k \rceil` second gradients.

  Args:
    k: the period, an integer ``>= 1``.

  Returns:
    A :class:`Policy` whose state is a step count.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> policy, g = optax_sam.every(3), jnp.ones(2)
    >>> state, picks = policy.init(), []
    >>> for _ in range(7):
    ...   sam_step, state = policy.decide(g, state)
    ...   picks.append(bool(sam_step))
    >>> picks
    [True, False, False, True, False, False, True]

  References:
    Liu et al., 2022, "Towards Efficient and Scalable Sharpness-Aware
    Minimization" (LookSAM's period): https://arxiv.org/abs/2203.02714
  """
  k = numerics.check_integer('k', k, 1)

  def decide(grads, state):
    del grads
    return state.count % k == 0, CountState(optax.safe_increment(state.count))

  return Policy(lambda: CountState(_zero_count()), decide, reads_gradient=False)


def after(n: int) -> Policy:
  """Plain steps before step ``n``, then SAM on every step: SAM late in training.

  ``after(0)`` is SAM on every step. For SAM on the last quarter of a run of
  ``N`` steps, ``after(int(0.75 * N))``.

  Args:
    n: the number of plain steps first, an integer ``>= 0``.

  Returns:
    A :class:`Policy` whose state is a step count.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> policy, state = optax_sam.after(2), optax_sam.after(2).init()
    >>> picks = []
    >>> for _ in range(4):
    ...   sam_step, state = policy.decide(jnp.ones(2), state)
    ...   picks.append(bool(sam_step))
    >>> picks
    [False, False, True, True]

  References:
    Andriushchenko and Flammarion, 2022, "Towards Understanding
    Sharpness-Aware Minimization" (SAM late in training helps as much):
    https://arxiv.org/abs/2206.06232
  """
  n = numerics.check_integer('n', n, 0)

  def decide(grads, state):
    del grads
    return state.count >= n, CountState(optax.safe_increment(state.count))

  return Policy(lambda: CountState(_zero_count()), decide, reads_gradient=False)


def randomly(p: float, seed: int) -> Policy:
  """Each step is a SAM step with probability ``p``, drawn from an explicit seed.

  Step ``t`` draws ``bernoulli(fold_in(key(seed), t), p)``: the choices depend
  only on the seed and the step, so a resumed run (the state is checkpointed
  with the optimizer's) and every device make the same ones.

  Args:
    p: the probability of a SAM step, in ``[0, 1]``.
    seed: an integer seed.

  Returns:
    A :class:`Policy` whose state is a step count and a PRNG key.

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> policy = optax_sam.randomly(0.5, seed=0)
    >>> state, n = policy.init(), 0
    >>> for _ in range(1000):
    ...   sam_step, state = policy.decide(jnp.ones(2), state)
    ...   n += int(sam_step)
    >>> 450 < n < 550
    True

  References:
    Zhao et al., 2022, "SS-SAM: Stochastic Scheduled Sharpness-Aware
    Minimization for Efficiently Training Deep Neural Networks":
    https://arxiv.org/abs/2203.09962
  """
  numerics.check_range('p', p, 0.0, 1.0)
  seed = numerics.check_integer('seed', seed, -(2**63))

  def init():
    return RandomState(_zero_count(), jax.random.key_data(jax.random.key(seed)))

  def decide(grads, state):
    del grads
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
    return (
      jax.random.bernoulli(key, p),
      RandomState(optax.safe_increment(state.count), state.key),
    )

  return Policy(init, decide, reads_gradient=False)


def ae_sam(
  total_steps: int,
  *,
  delta: float = 0.9,
  lambda1: float = -1.0,
  lambda2: float = 1.0,
) -> Policy:
  r"""AE-SAM's adaptive policy: SAM when the squared gradient norm is unusually large.

  With :math:`s_t = \|g_t\|^2` (the averaged gradient under ``axis_name``):

  .. math::

    \mu_t = \delta \mu_{t-1} + (1 - \delta) s_t, \quad
    \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta) (s_t - \mu_t)^2, \\
    c_t = \lambda_1 + (\lambda_2 - \lambda_1) \min(t / T, 1), \qquad
    \text{SAM step} \iff s_t \ge \mu_t + c_t \sigma_t,

  from :math:`\mu_0 = \sigma_0 = 0`. The threshold rises linearly over the
  run, so SAM is used often early and less late (about half the steps for
  roughly normal :math:`s_t` and the default :math:`\lambda_1 = -1, \lambda_2 = 1`).
  The defaults are ours: the paper tunes :math:`\lambda_1, \lambda_2` per task
  for a target share of SAM steps; ``delta = 0.9`` is a usual EMA decay.

  Args:
    total_steps: ``T``, the run's length in steps (an integer ``>= 1``).
    delta: EMA decay, in ``[0, 1]``.
    lambda1: the threshold's multiple of :math:`\sigma_t` at step 0.
    lambda2: the threshold's multiple at step ``T`` and after.

  Returns:
    A :class:`Policy` whose state is a step count and the two EMAs (float32).

  Example:
    >>> import jax.numpy as jnp, optax_sam
    >>> policy = optax_sam.ae_sam(total_steps=100)
    >>> sam_step, state = policy.decide(jnp.ones(4), policy.init())
    >>> bool(sam_step), float(state.mean)  # s_0 = 4 >= 0.4 - 1 * sigma_0
    (True, 0.4...)

  References:
    Jiang et al., 2023, "An Adaptive Policy to Employ Sharpness-Aware
    Minimization": https://arxiv.org/abs/2304.14647
  """
  total_steps = numerics.check_integer('total_steps', total_steps, 1)
  numerics.check_range('delta', delta, 0.0, 1.0)
  for name, value in (('lambda1', lambda1), ('lambda2', lambda2)):
    numerics.check_range(name, value, -float('inf'), float('inf'))

  def init():
    zero = jnp.zeros([], jnp.float32)
    return AESAMState(_zero_count(), zero, zero)

  def decide(grads, state):
    dtype = state.mean.dtype
    s = jnp.square(numerics.global_norm(grads)).astype(dtype)
    d = jnp.asarray(delta, dtype)
    mean = d * state.mean + (1 - d) * s
    var = d * state.var + (1 - d) * jnp.square(s - mean)
    progress = jnp.minimum(state.count.astype(dtype) / total_steps, 1)
    c = jnp.asarray(lambda1, dtype) + jnp.asarray(lambda2 - lambda1, dtype) * progress
    take = s >= mean + c * jnp.sqrt(var)
    return take, AESAMState(optax.safe_increment(state.count), mean, var)

  return Policy(init, decide)
