"""ASAM's parameter-wise scaling ``T = |w| + eta`` and the masks that choose its leaves."""

from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

MaskOrFn = Union[None, Any, Callable[[optax.Params], Any]]


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def not_bias_mask(params: optax.Params) -> Any:
  """Selects every leaf except those whose name (last path key) is ``bias``.

  This is the official ASAM code's choice (it scales every parameter named
  "weight", normalization scales included, and leaves biases alone), written
  for JAX trees: Flax names biases ``bias`` in both Linen and NNX. It is the
  default ``adaptive_mask`` of :func:`asam`.

  Args:
    params: a tree of parameters (dicts, Flax states, dataclasses, ...).

  Returns:
    A tree of Python bools with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_sam
    >>> optax_sam.not_bias_mask({'dense': {'kernel': jnp.ones(2), 'bias': jnp.ones(2)}})
    {'dense': {'bias': False, 'kernel': True}}

  References:
    Kwon et al., 2021, "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks": https://arxiv.org/abs/2102.11600
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not (path and _key_name(path[-1]) == 'bias'), params
  )


def resolve_mask(mask: MaskOrFn, params: optax.Params) -> Any:
  """A tree of bools with the structure of ``params`` (None selects all).

  As in ``optax.masked``, the mask (or what a callable mask returns) may be a
  prefix of ``params``: a bool then applies to the whole subtree below it.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if callable(mask):
    mask = mask(params)
  return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)


def adaptive_scale(params: optax.Params, eta: Any, mask: MaskOrFn) -> Any:
  """ASAM's ``T``: ``|w| + eta`` on the leaves ``mask`` selects, 1 elsewhere.

  Computed in float32 or wider (the leaf's dtype when wider), so that the
  norms and the perturbation built from it keep their precision for
  low-precision parameters.
  """
  selected = resolve_mask(mask, params)

  def leaf_scale(w, use):
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(w))
    if use:
      return jnp.abs(w).astype(dtype) + jnp.asarray(eta, dtype)
    return jnp.ones([], dtype)

  return jax.tree.map(leaf_scale, params, selected)


def scaled(tree: Any, scale: Any, power: int = 1) -> Any:
  """``T**power * tree`` leaf by leaf, in float32 or wider (dtype of ``T``)."""
  return jax.tree.map(lambda x, t: x.astype(t.dtype) * t**power, tree, scale)
