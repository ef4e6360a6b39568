"""Convolutions in the layout XLA:CPU's fast kernels take, for code that runs inside control flow.

XLA:CPU runs a convolution on its fast (Eigen) kernels only when the input is
laid out batch-spatial-feature and the kernel spatial-in-out. Its
``conv_canonicalization`` pass rewrites other convolutions into that form with
transposes, but it visits only the entry computation: a convolution inside a
``lax.cond`` branch or a loop body keeps its dimension order and runs on a
generic loop 30 to 40 times slower. The gradients of a convolution
(``jax.grad`` transposes it) are never in that order, so SAM's second gradient
under ``when=`` would cost many plain steps on CPU.

This module is the one seam through which optax_sam runs user code in control
flow: :func:`cond` and :func:`scan` (and :func:`canonical` for loops of the
diagnostics) do the compiler's rewrite themselves, on the function's jaxpr:
every convolution becomes transposes around a convolution in the canonical
order. The result is the same computation (transposes are exact). The choice
is made for the platform the program is lowered for
(``lax.platform_dependent``): GPU and TPU programs get the function's own
jaxpr. Users can turn the rewrite off with the environment variable
``OPTAX_SAM_CPU_CONVOLUTIONS=0``, and it retires itself on the jaxlib version
named in :data:`XLA_CPU_FIXED_IN` once XLA:CPU canonicalizes convolutions in
control flow (a test fails when that happens, to have the version set).
"""

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.extend.core as jex
import jaxlib
import numpy as np
from jax import lax

_conv_p = jex.primitives.conv_general_dilated_p
_jit_p = jex.primitives.jit_p

# The first jaxlib whose XLA:CPU canonicalizes convolutions inside control flow; None while none
# does (tests/test_cpu_convolutions.py checks it on the installed version).
XLA_CPU_FIXED_IN: Optional[tuple[int, ...]] = None
OPT_OUT = 'OPTAX_SAM_CPU_CONVOLUTIONS'


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in text.split('.')[:3] if part.isdigit())


def enabled() -> bool:
  """Whether the rewrite applies: not opted out, and this jaxlib's XLA:CPU still needs it."""
  if os.environ.get(OPT_OUT, '1').strip().lower() in ('0', 'false', 'off', 'no'):
    return False
  return XLA_CPU_FIXED_IN is None or _version(jaxlib.__version__) < XLA_CPU_FIXED_IN


def cond(pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands) -> Any:
  """``lax.cond`` whose branches run canonical convolutions on CPU (see :func:`canonical`)."""
  return lax.cond(pred, canonical(true_fn), canonical(false_fn), *operands)


def scan(body: Callable[[Any, Any], Any], init: Any, xs: Any, length: Optional[int] = None) -> Any:
  """``lax.scan`` whose body runs canonical convolutions on CPU (see :func:`canonical`)."""
  return lax.scan(canonical(body), init, xs, length=length)


def canonical(fn: Callable[..., Any]) -> Callable[..., Any]:
  r"""``fn`` with its convolutions in the order XLA:CPU runs fast, in programs lowered for CPU.

  Each ``lax.conv_general_dilated`` in ``fn`` (also inside ``jax.jit``-wrapped
  calls without shardings of their own, which are inlined) with input
  dimensions other than batch-spatial-feature, kernel dimensions other than
  spatial-in-out, or output dimensions other than batch-spatial-feature runs as

  .. math::

    y = P_{out}^{-1}\big(\mathrm{conv}(P_{in}(x), P_{kernel}(k))\big),

  with :math:`P` the transposes into the canonical orders, the rewrite XLA:CPU
  applies itself only outside control flow. Left as they are: convolutions
  with an explicit ``out_sharding``, those inside ``jax.jit`` calls that set
  shardings, and those inside higher-order operations (``lax.cond``, loops,
  ``jax.checkpoint``, custom derivatives), which are bound unchanged. The
  values are those of ``fn``.

  Args:
    fn: a function returning a pytree of arrays. Its arguments may be any
      pytrees: their ``jax.Array`` leaves are traced, the other leaves (Python
      numbers and flags, NumPy arrays, strings) reach ``fn`` as they are.

  Returns:
    A function with ``fn``'s signature. It traces ``fn`` once to a jaxpr and
    stages out both versions with ``lax.platform_dependent``: a program lowered
    for CPU evaluates the rewritten jaxpr, any other platform the jaxpr as
    traced (only the chosen one is lowered). When :func:`enabled` is False it
    is ``fn`` itself.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sam._src import cpu_convolutions
    >>> x, k = jnp.ones((2, 8, 3)), jnp.ones((3, 3, 4))  # NWC input, WIO kernel
    >>> loss = lambda k: jnp.sum(jax.lax.conv_general_dilated(
    ...   x, k, (1,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC')) ** 2)
    >>> g = jax.grad(loss)  # its kernel-gradient convolution is not canonical
    >>> bool(jnp.allclose(cpu_convolutions.canonical(g)(k), g(k)))
    True
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    if not enabled():
      return fn(*args, **kwargs)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [isinstance(leaf, jax.Array) for leaf in leaves]

    def call(arrays):
      arrays = iter(arrays)
      full = [next(arrays) if t else leaf for leaf, t in zip(leaves, traced, strict=True)]
      a, kw = jax.tree.unflatten(treedef, full)
      return fn(*a, **kw)

    arrays = [leaf for leaf, t in zip(leaves, traced, strict=True) if t]
    closed, out_shape = jax.make_jaxpr(call, return_shape=True)(arrays)
    if not any(_has_convolution(eqn) for eqn in closed.jaxpr.eqns):
      flat = jex.jaxpr_as_fun(closed)(*arrays)
    else:
      flat = lax.platform_dependent(
        *arrays,
        cpu=lambda *a: _evaluate(closed.jaxpr, closed.consts, list(a)),
        default=jex.jaxpr_as_fun(closed),
      )
    return jax.tree.unflatten(jax.tree.structure(out_shape), list(flat))

  return wrapped


def _has_convolution(eqn: jex.JaxprEqn) -> bool:
  """Whether the rewrite would change ``eqn``: a convolution, or a jit call that holds one."""
  if eqn.primitive is _conv_p:
    return eqn.params.get('out_sharding') is None
  return _inlinable(eqn) and any(_has_convolution(e) for e in eqn.params['jaxpr'].jaxpr.eqns)


def _is_unspecified(shardings: Any) -> bool:
  # jit's placeholder for "no sharding given" (jax._src.sharding_impls.UnspecifiedValue)
  return all(type(s).__name__ == 'UnspecifiedValue' for s in shardings)


def _inlinable(eqn: jex.JaxprEqn) -> bool:
  """A ``jax.jit`` call that sets no shardings: inlining it changes nothing but the convolutions."""
  params = eqn.params
  return (
    eqn.primitive is _jit_p
    and isinstance(params.get('jaxpr'), jex.ClosedJaxpr)
    and _is_unspecified(params.get('in_shardings', ()))
    and _is_unspecified(params.get('out_shardings', ()))
  )


def _evaluate(jaxpr: jex.Jaxpr, consts: list, args: list) -> list:
  """``jaxpr`` on ``args``, with canonical convolutions (as ``jax.core.eval_jaxpr`` binds)."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for var, value in zip(jaxpr.constvars, consts, strict=True):
    env[var] = value
  for var, value in zip(jaxpr.invars, args, strict=True):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = str(eqn.source_info.name_stack)  # the user's jax.named_scope s, kept in the HLO
    with jax.named_scope(name) if name else contextlib.nullcontext():
      if eqn.primitive is _conv_p and eqn.params.get('out_sharding') is None:
        outvals = [_canonical_convolution(*invals, **eqn.params)]
      elif _inlinable(eqn):
        inner = eqn.params['jaxpr']
        outvals = _evaluate(inner.jaxpr, inner.consts, invals)
      else:
        bound = eqn.primitive.get_bind_params(eqn.params)
        # (subfuns, params) before jax 0.9, params since
        subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
        with eqn.ctx.manager:
          outvals = eqn.primitive.bind(*subfuns, *invals, **params)
        if not eqn.primitive.multiple_results:
          outvals = [outvals]
    for var, value in zip(eqn.outvars, outvals, strict=True):
      env[var] = value  # a dropped output (DropVar) is written and never read
  return [read(v) for v in jaxpr.outvars]


def _canonical_convolution(lhs, rhs, *, dimension_numbers, **params):
  """A ``conv_general_dilated`` on batch-spatial-feature input and output, spatial-in-out kernel."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = len(lhs_spec)
  spatial = tuple(range(1, n - 1))
  canonical = lax.ConvDimensionNumbers(
    lhs_spec=(0, n - 1, *spatial),
    rhs_spec=(n - 1, n - 2, *range(n - 2)),
    out_spec=(0, n - 1, *spatial),
  )
  if tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, canonical)):
    return _conv_p.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  lhs = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  rhs = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  out = _conv_p.bind(lhs, rhs, dimension_numbers=canonical, **params)
  # Axis i of ``out`` is axis order[i] of the original output.
  order = (out_spec[0], *out_spec[2:], out_spec[1])
  return lax.transpose(out, tuple(int(i) for i in np.argsort(order)))
