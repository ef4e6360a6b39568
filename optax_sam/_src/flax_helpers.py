"""Flax helpers: the perturbed pass of ``nnx.Module`` models, SAM steps for Linen ``TrainState``.

A SAM step evaluates the loss twice on the same minibatch: the clean pass at
``w`` (whose side effects, BatchNorm statistics and RNG counts, are the ones a
training loop keeps) and the perturbed pass at ``w + e`` (whose side effects
must be thrown away). For NNX models the perturbed pass runs on a copy of the
model rebuilt from a snapshot of its state taken *before* the clean pass, so it
sees the same BatchNorm statistics and, by default, draws the same dropout
masks as the clean pass, while the model itself keeps the clean pass's state.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import optax
from flax import nnx
from flax.training import train_state as train_state_lib

from optax_sam._src import sharpness_aware

GradFn = Callable[[Any], Any]
TrainStateT = TypeVar('TrainStateT', bound=train_state_lib.TrainState)

# Folded into every RNG key of the perturbed pass when ``reuse_rngs=False``: the
# streams then draw from keys that neither the clean pass nor later steps use.
_FRESH_RNG_SALT = 0x5A4D


def _snapshot(model: nnx.Module, args: tuple) -> tuple[Any, Callable[..., Any]]:
  """The RNG keys of ``model`` and ``args`` as they are now, and a runner on copies of them.

  ``run_copy(fn, params, keys)`` rebuilds the model (and any NNX objects in
  ``args``) from this snapshot with ``params`` and ``keys``, and returns
  ``(fn(model_copy, *args_copy), model_copy)``; the model itself is never changed.
  The snapshot holds arrays, so later passes cannot change it.
  """
  graphdef, keys, rest = nnx.split((model, args), nnx.RngKey, ...)
  keys, rest = nnx.as_pure(keys), nnx.as_pure(rest)

  def run_copy(fn, params, keys):
    model_copy, args_copy = nnx.merge(graphdef, keys, rest)
    nnx.update(model_copy, params)
    return fn(model_copy, *args_copy), model_copy

  return keys, run_copy


def _fresh(keys: Any) -> Any:
  """Keys that neither the clean pass nor later steps use (for ``reuse_rngs=False``)."""
  return jax.tree.map(lambda k: jax.random.fold_in(k, _FRESH_RNG_SALT), keys)


def nnx_grad_fn(
  loss_fn: Callable[..., Any],
  model: nnx.Module,
  *args: Any,
  has_aux: bool = False,
  reuse_rngs: bool = True,
) -> GradFn:
  """Builds the ``grad_fn`` of a SAM step for an ``nnx.Module``; call it before the clean pass.

  The returned function maps the (perturbed) parameters that
  ``nnx.Optimizer.update`` hands to the optimizer, a pure ``nnx.State`` of
  arrays, to the gradient of ``loss_fn(model, *args)`` at those parameters,
  with the same structure. It evaluates the loss on a copy of ``model`` (and of
  any NNX objects in ``args``) rebuilt from the state they hold *now*, so:

  * the perturbed pass never changes the model: BatchNorm statistics, other
    non-parameter variables and RNG streams stay as the clean pass left them,
    and the RNG count advances once per step, not twice;
  * with ``reuse_rngs=True`` (default) the perturbed pass draws the same
    dropout masks as a clean pass run after this call, as the original SAM
    code does; ``reuse_rngs=False`` draws fresh ones, from keys no other pass
    uses.

  Parameters are taken from the argument of the returned function; every other
  variable comes from the snapshot. Works inside ``nnx.jit`` and ``jax.jit``.

  Args:
    loss_fn: ``loss_fn(model, *args)`` returning a scalar loss, or ``(loss,
      aux)`` with ``has_aux=True``.
    model: the model, in the state the clean pass will start from.
    *args: the other arguments of ``loss_fn`` (the batch).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    reuse_rngs: draw the clean pass's randomness again (``True``) or fresh
      randomness (``False``) in the perturbed pass.

  Returns:
    ``grad_fn(params) -> grads`` for ``optimizer.update(model, grads,
    grad_fn=grad_fn)``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> from flax import nnx
    >>> import optax_sam.flax
    >>> rngs = nnx.Rngs(0, dropout=1)
    >>> model = nnx.Sequential(nnx.Linear(2, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs),
    ...                        nnx.Dropout(0.5, rngs=rngs), nnx.Linear(8, 1, rngs=rngs))
    >>> optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(0.1)), wrt=nnx.Param)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
    >>> grad_fn = optax_sam.flax.nnx_grad_fn(loss_fn, model, x, y)  # before the clean pass
    >>> grads = nnx.grad(loss_fn)(model, x, y)  # the clean pass
    >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)
    >>> int(model.layers[2].rngs.count[...])  # one dropout draw per step, not two
    1

  References:
    Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization": https://arxiv.org/abs/2010.01412
  """
  clean_keys, run_copy = _snapshot(model, args)
  keys = clean_keys if reuse_rngs else _fresh(clean_keys)

  def loss_at(params):
    out, _ = run_copy(loss_fn, params, keys)
    return out[0] if has_aux else out

  def grad_fn(params):
    return jax.grad(loss_at)(params)

  return grad_fn


def nnx_value_and_grad(
  loss_fn: Callable[..., Any],
  model: nnx.Module,
  *args: Any,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
  reuse_rngs: bool = True,
) -> tuple[Any, nnx.State, GradFn]:
  """The clean pass of a SAM step and its ``grad_fn``, in one call.

  Equivalent to :func:`nnx_grad_fn` followed by
  ``nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt),
  has_aux=has_aux)(model, *args)``: the model keeps the clean pass's state
  (BatchNorm statistics, RNG counts), and the perturbed pass of the returned
  ``grad_fn`` reuses its dropout masks. A SAM step is then::

    loss, grads, grad_fn = optax_sam.flax.nnx_value_and_grad(loss_fn, model, x, y)
    optimizer.update(model, grads, grad_fn=grad_fn)

  Args:
    loss_fn: ``loss_fn(model, *args)`` returning a scalar loss, or ``(loss,
      aux)`` with ``has_aux=True``.
    model: the model; the clean pass updates its non-parameter state.
    *args: the other arguments of ``loss_fn`` (the batch).
    wrt: the filter of the variables to differentiate (as in
      ``nnx.Optimizer(..., wrt=...)``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    reuse_rngs: see :func:`nnx_grad_fn`.

  Returns:
    ``(value, grads, grad_fn)``: ``value`` is the loss (or ``(loss, aux)``),
    ``grads`` the clean gradient as an ``nnx.State``, ``grad_fn`` the
    perturbed-pass gradient function for ``optimizer.update``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> from flax import nnx
    >>> import optax_sam.flax
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(0.1)), wrt=nnx.Param)
    >>> loss_fn = lambda model, x: jnp.mean((model(x) - 1.0) ** 2)
    >>> x = jnp.ones((4, 2))
    >>> losses = []
    >>> for _ in range(20):
    ...   loss, grads, grad_fn = optax_sam.flax.nnx_value_and_grad(loss_fn, model, x)
    ...   _ = optimizer.update(model, grads, grad_fn=grad_fn)
    ...   losses.append(float(loss))
    >>> losses[-1] < 0.01 * losses[0]
    True

  References:
    Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization": https://arxiv.org/abs/2010.01412
  """
  grad_fn = nnx_grad_fn(loss_fn, model, *args, has_aux=has_aux, reuse_rngs=reuse_rngs)
  value, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(
    model, *args
  )
  return value, grads, grad_fn


def nnx_functional_value_and_grad(
  output_fn: Callable[..., Any],
  output_loss: Callable[[Any], Any],
  model: nnx.Module,
  *args: Any,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
  reuse_rngs: bool = True,
) -> tuple[Any, nnx.State, GradFn]:
  r"""Functional-SAM's clean pass and ``grad_fn`` for an ``nnx.Module``.

  :func:`optax_sam.functional_value_and_grad` for NNX: the clean pass runs
  ``output_fn(model, *args)`` (e.g. the logits) and ``output_loss`` of its
  outputs, keeps the output gradient :math:`\nabla\ell(f(w))`, and leaves the
  model with the clean pass's state (BatchNorm statistics, RNG counts), as
  :func:`nnx_value_and_grad` does; ``grad_fn(w')`` returns
  :math:`J(w')^\top \nabla\ell(f(w))`, its forward pass on a copy of the model
  from the state before the clean pass (the same dropout masks with
  ``reuse_rngs``). A Functional-SAM step is then::

    loss, grads, grad_fn = optax_sam.flax.nnx_functional_value_and_grad(
      lambda model, x: model(x), lambda logits: loss_of(logits, y), model, x)
    optimizer.update(model, grads, grad_fn=grad_fn)

  Args:
    output_fn: ``output_fn(model, *args) -> outputs``.
    output_loss: ``output_loss(outputs) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
    model: the model; the clean pass updates its non-parameter state.
    *args: the other arguments of ``output_fn`` (the inputs).
    wrt: the filter of the variables to differentiate.
    has_aux: whether ``output_loss`` returns ``(loss, aux)``.
    reuse_rngs: see :func:`nnx_grad_fn`.

  Returns:
    ``(value, grads, grad_fn)`` as :func:`nnx_value_and_grad` returns them.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> from flax import nnx
    >>> import optax_sam.flax
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax_sam.sam(optax.adam(0.01)), wrt=nnx.Param)
    >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
    >>> loss_of = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> loss, grads, grad_fn = optax_sam.flax.nnx_functional_value_and_grad(
    ...   lambda model, x: model(x), loss_of, model, x)
    >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)

  References:
    Singh et al., 2025, "Avoiding spurious sharpness minimization broadens
    applicability of SAM": https://arxiv.org/abs/2502.02407
  """
  keys, run_copy = _snapshot(model, args)
  perturbed_keys = keys if reuse_rngs else _fresh(keys)

  def outputs_at(params, keys):
    outputs, model_copy = run_copy(output_fn, params, keys)
    return outputs, nnx.as_pure(nnx.state(model_copy))

  variables = nnx.state(model, wrt)
  outputs, pullback, after = jax.vjp(
    lambda p: outputs_at(p, keys), nnx.as_pure(variables), has_aux=True
  )
  value, output_grads = jax.value_and_grad(output_loss, has_aux=has_aux)(outputs)
  (grads,) = pullback(output_grads)
  nnx.update(model, after)  # the clean pass's state: BatchNorm statistics, RNG counts

  def grad_fn(params):
    _, pullback_there = jax.vjp(lambda p: outputs_at(p, perturbed_keys)[0], params)
    return pullback_there(output_grads)[0]

  is_variable = lambda x: isinstance(x, nnx.Variable)
  grads = jax.tree.map(lambda v, g: v.replace(g), variables, grads, is_leaf=is_variable)
  return value, grads, grad_fn


# The NNX normalization layers whose parameters SAM-ON perturbs.
NORMALIZATION_LAYERS = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)


def nnx_normalization_mask(
  model: nnx.Module, wrt: Any = nnx.Param, layers: tuple = NORMALIZATION_LAYERS
) -> Any:
  """SAM-ON's ``perturb_mask`` for an NNX model: ``True`` on the normalization layers' parameters.

  Finds the layers by their type (``nnx.BatchNorm``, ``nnx.LayerNorm``, ``nnx.GroupNorm``,
  ``nnx.RMSNorm``, or ``layers``), not by attribute names, and returns a tree of bools with
  the structure of ``nnx.as_pure(nnx.state(model, wrt))``, the tree ``nnx.Optimizer`` hands
  the transformation.

  Args:
    model: the model.
    wrt: the filter of the optimized variables (as in ``nnx.Optimizer(..., wrt=...)``).
    layers: the module types whose parameters are selected.

  Returns:
    The mask, for ``perturb_mask=`` on any alias.

  Example:
    >>> import optax, optax_sam
    >>> from flax import nnx
    >>> import optax_sam.flax
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.LayerNorm(3, rngs=rngs))
    >>> mask = optax_sam.flax.nnx_normalization_mask(model)
    >>> mask['layers'][0]['kernel'], mask['layers'][1]['scale']
    (False, True)
    >>> tx = optax_sam.sam(optax.sgd(0.1), rho=0.5, perturb_mask=mask)

  References:
    Müller et al., 2023, "Normalization Layers Are All That Sharpness-Aware
    Minimization Needs": https://arxiv.org/abs/2306.04226
  """
  found = [tuple(path) for path, module in nnx.iter_modules(model) if isinstance(module, layers)]
  key_of = lambda entry: getattr(entry, 'key', getattr(entry, 'idx', entry))

  def selected(path, _):
    keys = tuple(key_of(entry) for entry in path)
    return any(keys[: len(p)] == p for p in found)

  return jax.tree_util.tree_map_with_path(selected, nnx.as_pure(nnx.state(model, wrt)))


def nnx_clean_params(model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.State:
  """The unperturbed parameters of a model trained with a two-phase SAM ``nnx.Optimizer``.

  Between the two ``optimizer.update`` calls of a two-phase step the model
  holds ``w + e``; this returns ``w`` then and the model's parameters
  otherwise, as a pure ``nnx.State`` (see :func:`optax_sam.clean_params`).
  ``nnx.update(model, nnx_clean_params(model, optimizer))`` puts them back.

  Args:
    model: the model.
    optimizer: its ``nnx.Optimizer``, built with a ``two_phase=True`` (or a
      one-call) SAM transformation.

  Returns:
    The parameters selected by the optimizer's ``wrt`` filter, unperturbed.

  Example:
    >>> import jax.numpy as jnp, optax, optax_sam
    >>> from flax import nnx
    >>> import optax_sam.flax
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> tx = optax_sam.sam(optax.sgd(0.1), rho=0.5, two_phase=True)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> before = nnx.as_pure(nnx.state(model, nnx.Param))
    >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
    >>> _ = optimizer.update(model, grads)  # first call: the model now holds w + e
    >>> clean = optax_sam.flax.nnx_clean_params(model, optimizer)
    >>> bool(jnp.all(clean['kernel'] == before['kernel']))
    True

  References:
    Foret et al., 2021: https://arxiv.org/abs/2010.01412
  """
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  return sharpness_aware.clean_params(params, nnx.as_pure(optimizer.opt_state))


def nnx_loss_fn(
  loss_fn: Callable[..., Any],
  model: nnx.Module,
  *,
  train: bool,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
) -> tuple[Callable[[Any, Any], jax.Array], nnx.State]:
  """A pure ``loss_fn(params, batch)`` of an ``nnx.Module``, for :mod:`optax_sam.sharpness`.

  Splits ``model`` into its graph, the parameters selected by ``wrt`` and
  everything else (BatchNorm statistics, RNG state), snapshotted now; the
  returned function merges a copy with the given parameters and evaluates
  ``loss_fn(model_copy, batch)``. It never changes ``model``, and it is a
  deterministic function of ``(params, batch)``, as the Hessian and the
  sharpness measures need. ``train`` must be chosen, because the two modes
  measure different functions:

  * ``train=False`` (eval mode: BatchNorm uses its running statistics,
    dropout is off) measures the function that is deployed; the loss is a
    mean of per-example losses, so splitting the batch into chunks
    (``num_chunks``) gives the same answer.
  * ``train=True`` (train mode: BatchNorm normalizes with the statistics of
    the batch it is given, dropout is on) measures the landscape the optimizer
    sees. The loss then depends on the batch's composition (and on the chunk
    size: each chunk is normalized with its own statistics), and dropout
    draws the *same* masks at every evaluation, from the model's RNG state as
    snapshotted here (a fixed sub-network; advance the model's ``Rngs`` for
    other masks). The running statistics this mode computes are discarded.

  Args:
    loss_fn: ``loss_fn(model, batch)`` returning a scalar, or ``(loss, aux)``
      with ``has_aux=True`` (``aux`` is dropped).
    model: the model.
    train: evaluate in train mode (``True``) or eval mode (``False``); set on a
      view of the model (``nnx.view``), not on ``model`` itself.
    wrt: the filter of the variables that are the parameters ``w``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(loss_of_params, params)``: ``loss_of_params(params, batch) ->
    scalar`` and the model's current parameters, a pure ``nnx.State``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from optax_sam import sharpness
    >>> import optax_sam.flax
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs),
    ...                        nnx.Dropout(0.2, rngs=rngs), nnx.Linear(4, 1, rngs=rngs))
    >>> loss = lambda model, batch: jnp.mean((model(batch[0]) - batch[1]) ** 2)
    >>> loss_fn, params = optax_sam.flax.nnx_loss_fn(loss, model, train=False)
    >>> batch = (jnp.ones((8, 2)), jnp.zeros((8, 1)))
    >>> r = sharpness.hessian_eigenvalues(loss_fn, params, batch, key=jax.random.key(0))
    >>> r.eigenvalues.shape
    (1,)
  """
  viewed = nnx.view(
    model, deterministic=not train, use_running_average=not train, raise_if_not_found=False
  )
  graphdef, params, rest = nnx.split(viewed, wrt, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def loss_of_params(p: Any, batch: Any) -> jax.Array:
    out = loss_fn(nnx.merge(graphdef, p, rest), batch)
    return out[0] if has_aux else out

  return loss_of_params, params


def apply_gradients(
  state: TrainStateT,
  *,
  grads: Any,
  grad_fn: GradFn | None = None,
  **changes: Any,
) -> TrainStateT:
  """``TrainState.apply_gradients`` for one-call SAM: forwards ``grad_fn`` to the optimizer.

  Flax's ``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state,
  params)`` without extra arguments, so it cannot run one-call SAM. This does
  the same update with ``grad_fn`` passed through, then ``state.replace``:
  ``step`` is incremented, ``params`` and ``opt_state`` updated, and
  ``changes`` (e.g. ``batch_stats`` from the clean pass) replaced.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or a subclass).
    grads: the clean gradient, with the structure of ``state.params``.
    grad_fn: ``grad_fn(params) -> grads`` for the perturbed pass; ``None``
      calls ``tx.update`` without it (for non-SAM or two-phase optimizers).
    **changes: other fields to replace, as in ``apply_gradients``.

  Returns:
    The updated state.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_sam
    >>> import flax.linen as nn
    >>> from flax.training import train_state
    >>> import optax_sam.flax
    >>> model = nn.Dense(1)
    >>> x = jnp.ones((4, 2))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> state = train_state.TrainState.create(
    ...     apply_fn=model.apply, params=params, tx=optax_sam.sam(optax.sgd(0.1)))
    >>> loss = lambda p: jnp.mean(state.apply_fn({'params': p}, x) ** 2)
    >>> state = optax_sam.flax.apply_gradients(
    ...     state, grads=jax.grad(loss)(state.params), grad_fn=jax.grad(loss))
    >>> int(state.step)
    1

  References:
    Foret et al., 2021: https://arxiv.org/abs/2010.01412
  """
  extra = {} if grad_fn is None else {'grad_fn': grad_fn}
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **changes)
