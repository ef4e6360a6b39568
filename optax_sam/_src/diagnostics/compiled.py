"""One compiled program per loss function and budget: the Hessian estimators under ``jax.jit``.

Called outside ``jit``, an estimator built from closures (the Hessian-vector
product of ``loss_fn`` at ``params``) would trace and compile its Lanczos or
probe loop again at every call and dispatch the rest op by op: on a 2,688-parameter
MLP, ``hessian_eigenvalues`` took 4.8 s the first time and 0.9 s every time
after. Under one ``jax.jit`` with ``loss_fn`` and the budgets static, the first
call compiles once (1.0 s there) and later calls with the same ``loss_fn``
object and the same shapes reuse the program (3 ms there). Inside a caller's
``jit`` the inner ``jit`` is inlined.
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from optax_sam._src.diagnostics import vector_layout

Estimator = TypeVar('Estimator', bound=Callable[..., Any])


def compiled(*static: str) -> Callable[[Estimator], Estimator]:
  """Decorates an estimator ``f(loss_fn, params, batch, **options)`` with ``jax.jit``.

  Args:
    *static: the names of the static arguments besides ``loss_fn`` (the budgets and choices).
      An estimator's ``layout`` is resolved here, outside the program, on the concrete
      ``params`` (:func:`vector_layout.resolve`).

  Returns:
    The decorator. Where the program cannot be keyed or traced, the estimator runs as it
    is, without the outer ``jit``: a ``loss_fn`` that cannot be hashed, or params, batch or
    key with leaves that are not arrays (a batch may carry static values, e.g. a string, that
    ``loss_fn`` reads in Python).
  """

  def decorate(estimator: Estimator) -> Estimator:
    names = ('loss_fn', *static)
    jitted = jax.jit(estimator, static_argnames=names)
    signature = inspect.signature(estimator)

    @functools.wraps(estimator)
    def call(loss_fn, *args, **kwargs):
      arguments = signature.bind(loss_fn, *args, **kwargs).arguments
      if 'layout' in signature.parameters:
        # Chosen on the concrete parameters, whose shardings the traced program cannot see.
        layout = arguments.get('layout', signature.parameters['layout'].default)
        arguments['layout'] = vector_layout.resolve(layout, arguments['params'])
      dynamic = [value for name, value in arguments.items() if name not in names]
      traceable = all(isinstance(x, (jax.Array, np.ndarray)) for x in jax.tree.leaves(dynamic))
      try:
        hash(loss_fn)
      except TypeError:
        traceable = False
      return (jitted if traceable else estimator)(**arguments)

    return call  # type: ignore[return-value]

  return decorate
