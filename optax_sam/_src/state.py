"""The SAM states, one helper that finds a state inside any optimizer state, and the held weights.

Three states can sit anywhere in a user's optimizer state (under
``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``...):
:class:`SAMState` (one-call mode), :class:`TwoPhaseSAMState` and
:class:`MomentumSAMState`. The last two may leave the model holding perturbed
weights; each says so itself (``holds_perturbed``) and gives the clean weights
(``clean``), so that :func:`clean_params` and :func:`is_perturbed` agree for
every optimizer. Every lookup of a node in a nested state goes through
:func:`find_states`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def find_states(tree: Any, types: type | tuple[type, ...]) -> list[tuple[Any, Any]]:
  """Every node of ``tree`` that is an instance of ``types``, with its path, in tree order.

  Modelled on ``optax.tree_utils.tree_get_all_with_path``, which finds nodes by
  their name: this one finds them by their type, and does not look inside a
  node it found.

  Args:
    tree: a pytree, e.g. an optimizer state.
    types: a type or a tuple of types (``NamedTuple`` state classes).

  Returns:
    A list of ``(path, node)`` pairs, ``path`` a tuple of JAX key entries.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optax_sam._src import state
    >>> opt_state = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, 0.9)).init(
    ...   jnp.zeros(2))
    >>> [type(node).__name__ for _, node in state.find_states(opt_state, optax.TraceState)]
    ['TraceState']
  """
  is_match = lambda x: isinstance(x, types)
  found, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_match)
  return [(path, node) for path, node in found if is_match(node)]


def find_one(tree: Any, types: type | tuple[type, ...], what: str) -> Any:
  """The one node of ``tree`` of ``types``, or ``None`` if there is none.

  Raises:
    ValueError: when there are several, naming ``what`` they are.
  """
  found = find_states(tree, types)
  if len(found) > 1:
    raise ValueError(f'found {len(found)} {what} in the state where one was expected.')
  return found[0][1] if found else None


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

  def holds_perturbed(self) -> jax.Array:
    """Whether the weights hold ``w + e``: between the two calls of a SAM step."""
    return self.phase == 1

  def clean(self, params: optax.Params) -> optax.Params:
    """The clean weights, given the weights the model holds."""
    return optax.tree.where(self.holds_perturbed(), self.clean_params, params)


class MomentumSAMState(NamedTuple):
  """State of :func:`momentum_sam`.

  Attributes:
    scale: ``rho / (||v|| + eps)`` for the momentum ``v`` in ``base_state``:
      the held weights are ``w - scale * v`` (0 before the first step).
    base_state: state of the base optimizer, at the clean weights.
  """

  scale: jax.Array
  base_state: optax.OptState

  def holds_perturbed(self) -> jax.Array:
    """Whether the held weights differ from the clean ones: after any step with ``rho > 0``."""
    return self.scale != 0

  def clean(self, params: optax.Params) -> optax.Params:
    """``w = held + scale * v``: the clean weights, given the held ones."""
    return add_scaled(params, self.scale, momentum(self.base_state))


MOMENTUM_STATES = (optax.TraceState, optax.ScaleByAdamState)


def momentum(base_state: optax.OptState) -> optax.Updates:
  """The momentum ``v`` in a base optimizer's state: SGD's trace or Adam's first moment.

  Args:
    base_state: the state of ``optax.sgd(..., momentum=...)``, ``optax.adam``,
      ``optax.adamw`` or any chain holding exactly one ``optax.TraceState`` or
      ``optax.ScaleByAdamState``.

  Returns:
    The trace (``TraceState.trace``) or the first moment (``ScaleByAdamState.mu``).

  Raises:
    ValueError: when the state holds no momentum, or more than one.
  """
  states = find_states(base_state, MOMENTUM_STATES)
  if len(states) != 1:
    found = 'no momentum' if not states else f'{len(states)} momenta'
    raise ValueError(
      'momentum_sam needs a base_optimizer with exactly one momentum (optax.sgd with '
      'momentum > 0, optax.adam, optax.adamw, or a chain holding one optax.trace or '
      f'optax.scale_by_adam); its state holds {found}.'
    )
  ((_, state),) = states
  return state.trace if isinstance(state, optax.TraceState) else state.mu


def second_moment(base_state: optax.OptState) -> optax.Updates:
  """Adam's second moment ``nu`` in a base optimizer's state (``optax.adam``, ``adamw``, a chain).

  Args:
    base_state: a state holding exactly one ``optax.ScaleByAdamState``.

  Returns:
    ``ScaleByAdamState.nu``, not bias-corrected.

  Raises:
    ValueError: when the state holds none, or more than one.
  """
  states = find_states(base_state, optax.ScaleByAdamState)
  if len(states) != 1:
    raise ValueError(
      "a preconditioned ascent reads the base optimizer's second moment: use optax.adam, "
      'optax.adamw or a chain holding one optax.scale_by_adam (the state holds '
      f'{len(states)} Adam states).'
    )
  return states[0][1].nu


def add_scaled(params: Any, scale: jax.Array, v: Any) -> Any:
  """``params + scale * v`` in the params' dtypes."""
  return jax.tree.map(
    lambda p, m: (p.astype(scale.dtype) + scale * m.astype(scale.dtype)).astype(p.dtype), params, v
  )


# The states after which the model may hold other weights than the clean ones.
HOLDING_STATES = (TwoPhaseSAMState, MomentumSAMState)


def _holding_state(state: optax.OptState) -> Any:
  return find_one(state, HOLDING_STATES, 'two-phase or Momentum-SAM states')


def clean_params(params: optax.Params, state: optax.OptState) -> optax.Params:
  """The unperturbed weights, whatever the optimizer left the model holding.

  Between the two calls of a two-phase step the model holds ``w + e``; a
  :func:`momentum_sam` state always holds ``w - rho v / (||v|| + eps)``. This
  returns ``w`` then, and ``params`` otherwise (one-call states never leave the
  weights perturbed). ``state`` may be the SAM state itself or any state
  containing it (``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``). :func:`is_perturbed` tells whether the two differ.

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
  holder = _holding_state(state)
  return params if holder is None else holder.clean(params)


def is_perturbed(state: optax.OptState) -> jax.Array:
  """Whether the weights the model holds differ from the clean ones (see :func:`clean_params`).

  True between the two calls of a two-phase step, and for :func:`momentum_sam`
  after any step with ``rho > 0``; always False for one-call states.

  Args:
    state: the optimizer state (or any state containing a SAM state).

  Returns:
    A boolean scalar array.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> tx = optax_sam.sam(optax.sgd(0.1), two_phase=True)
    >>> bool(optax_sam.is_perturbed(tx.init(jnp.zeros(2))))
    False

  References:
    Foret et al., 2021: https://arxiv.org/abs/2010.01412
  """
  holder = _holding_state(state)
  return jnp.asarray(False) if holder is None else holder.holds_perturbed()
