"""Skipping a step whose gradient or update is not finite, the perturbed pass included."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import numerics, options
from optax_sam._src import state as state_lib


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner_state: the wrapped optimizer's state, as of the last step that was applied.
    skipped_steps: how many steps were skipped so far (``int32``).
    consecutive_skips: how many of the last steps were skipped in a row (``int32``).
    last_finite: whether the last step was finite (and so applied).
  """

  inner_state: Any
  skipped_steps: jax.Array
  consecutive_skips: jax.Array
  last_finite: jax.Array


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite(
  optimizer: optax.GradientTransformation, max_consecutive_skips: Optional[int] = None
) -> optax.GradientTransformationExtraArgs:
  r"""Skips every step whose gradient, or whose update, holds a NaN or an inf.

  A SAM step takes a second gradient at :math:`w + e`, inside the update when
  ``grad_fn`` is passed. ``optax.apply_if_finite`` checks only the gradient it
  receives, the clean one, so a NaN or an overflow of the perturbed pass gets
  through it; and for F-SAM one NaN gradient that reaches the state stays in its
  EMA for good. This wrapper runs the step, then keeps its update and new state
  only when both the gradient it received and the update it produced are
  finite:

  .. math::

    (u_t, s_t) = \begin{cases}
      \mathrm{optimizer}(g_t, s_{t-1}) & \text{if } g_t \text{ and } u_t \text{ are finite} \\
      (0, s_{t-1}) & \text{otherwise.}
    \end{cases}

  A skipped step leaves the weights and every part of the inner state (F-SAM's
  EMA, the base optimizer's moments, a policy's counter) as they were. In
  two-phase mode each call is checked on its own: a skipped second call leaves
  the weights at :math:`w + e` with the state still waiting for the perturbed
  gradient, so the next call, at those weights, completes the step
  (:func:`optax_sam.clean_params` gives :math:`w` meanwhile).

  Args:
    optimizer: the optimizer to guard, typically a SAM optimizer
      (extra arguments such as ``grad_fn`` are passed through).
    max_consecutive_skips: if given, after this many skipped steps in a row the
      next non-finite step is applied anyway, so that a run that cannot recover
      shows NaN instead of silently standing still (as
      ``optax.apply_if_finite``'s ``max_consecutive_errors``). ``None``: never.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipNonfiniteState`; :func:`skipped_steps` reads its count.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> loss = lambda w: -jnp.sum(jnp.sqrt(w))  # NaN where w < 0
    >>> tx = optax_sam.skip_nonfinite(optax_sam.friendly_sam(optax.sgd(0.1), rho=2.0))
    >>> w = jnp.array([1.0, 4.0])
    >>> state = tx.init(w)
    >>> u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    >>> print(u, int(optax_sam.skipped_steps(state)))  # w + e left the domain
    [0. 0.] 1
    >>> print(optax.tree.get(state, 'ema'))  # F-SAM's EMA is untouched
    [0. 0.]

  References:
    Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", https://arxiv.org/abs/2010.01412 (the perturbed pass).
  """
  options.check_transformation('optimizer', optimizer)
  if max_consecutive_skips is not None:
    max_consecutive_skips = numerics.check_integer('max_consecutive_skips', max_consecutive_skips)
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params: optax.Params) -> SkipNonfiniteState:
    zero = jnp.zeros([], jnp.int32)
    return SkipNonfiniteState(inner.init(params), zero, zero, jnp.array(True))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    finite = _all_finite(updates) & _all_finite(new_updates)
    apply = finite
    if max_consecutive_skips is not None:
      apply = finite | (state.consecutive_skips >= max_consecutive_skips)
    new_updates = optax.tree.where(apply, new_updates, optax.tree.zeros_like(new_updates))
    new_inner = optax.tree.where(apply, new_inner, state.inner_state)
    skipped = (~apply).astype(jnp.int32)
    return new_updates, SkipNonfiniteState(
      new_inner,
      state.skipped_steps + skipped,
      jnp.where(finite, 0, state.consecutive_skips + 1),
      finite,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skipped_steps(state: optax.OptState) -> jax.Array:
  """How many steps :func:`skip_nonfinite` skipped, from a state containing its state.

  Args:
    state: the optimizer state, or any state containing a :class:`SkipNonfiniteState`.

  Returns:
    An ``int32`` scalar.

  Raises:
    ValueError: if the state holds no :class:`SkipNonfiniteState`, or several.
  """
  found = state_lib.find_one(state, SkipNonfiniteState, 'skip_nonfinite states')
  if found is None:
    raise ValueError(
      'the state holds no skip_nonfinite state: wrap the optimizer in optax_sam.skip_nonfinite.'
    )
  return found.skipped_steps
