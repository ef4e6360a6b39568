"""First-call (compile) and later-call time of the default Hessian estimators, beside matfree's.

Each (library, quantity) runs in a fresh Python process, so nothing is cached between them (the
persistent compilation cache is off): the first call's time is tracing, compiling and running; the
later calls' median is running alone. The problem is a tanh MLP on MNIST-1D-shaped inputs (40 -> 32
-> 32 -> 10, 2,698 parameters, batch 256, float32). The quantities, at optax_sam's defaults, and
what matfree is given for the same work (the same products; each peer call under one ``jax.jit``,
as a user would write it):

- ``eigenvalues``: the top eigenvalue, ``hessian_eigenvalues`` (22 Lanczos steps) against
  ``decomp.tridiag_sym(22)`` and the tridiagonal's ``eigvalsh``;
- ``eigenpair``: the same ``hessian_eigenvalues`` call, which also returns the top eigenvector
  (as a pytree like the parameters), against matfree computing it too: the tridiagonal's
  ``eigh``, the Lanczos basis times its top eigenvector, unraveled;
- ``trace``: Hutchinson with 60 products, ``hessian_trace`` against
  ``stochtrace.estimator_monte_carlo_mean_and_sem``;
- ``density``: SLQ with 4 probes of 32 steps, ``hessian_spectral_density`` against
  ``funm.monte_carlo_funm_sym`` (vmapped Lanczos and ``eigh``).

``optax_sam`` runs the default call (``layout='auto'``, which ravels the Krylov vectors of these
unsharded parameters); ``optax_sam tree`` the same call with ``layout='tree'``, the leaf-by-leaf
layout kept for sharded parameters and inside a caller's ``jit``. ``--hidden-layers`` sets the
depth, and with it the number of parameter leaves (2 per layer); ``--width`` the hidden width
(300: 105,610 parameters in 6 leaves).

    python -m benchmarks.curvature_first_call --repeats 3 [--hidden-layers 24] [--width 300]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

QUANTITIES = ('eigenvalues', 'eigenpair', 'trace', 'density')
LIBRARIES = ('optax_sam', 'optax_sam tree', 'matfree')


def problem(hidden_layers=2, width=32):
  """The tanh MLP, its data and loss; ``2 (hidden_layers + 1)`` parameter leaves."""
  import jax
  import jax.numpy as jnp

  sizes = (40, *(width,) * hidden_layers, 10)
  keys = jax.random.split(jax.random.key(0), len(sizes) + 1)
  params = [
    {'w': jax.random.normal(k, (a, b)) / a**0.5, 'b': jnp.zeros(b)}
    for k, a, b in zip(keys[: len(sizes) - 1], sizes[:-1], sizes[1:], strict=True)
  ]
  batch = (
    jax.random.normal(keys[-2], (256, sizes[0])),
    jax.random.randint(keys[-1], (256,), 0, sizes[-1]),
  )

  def loss_fn(params, batch):
    x, y = batch
    for layer in params[:-1]:
      x = jnp.tanh(x @ layer['w'] + layer['b'])
    logits = x @ params[-1]['w'] + params[-1]['b']
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  return loss_fn, params, batch


def optax_sam_call(quantity, loss_fn, layout):
  import functools

  from optax_sam import sharpness

  estimator = {
    'eigenvalues': sharpness.hessian_eigenvalues,
    'eigenpair': sharpness.hessian_eigenvalues,
    'trace': sharpness.hessian_trace,
    'density': sharpness.hessian_spectral_density,
  }[quantity]
  return functools.partial(estimator, loss_fn, layout=layout)


def matfree_call(quantity, loss_fn):
  import jax
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree
  from matfree import decomp, funm, stochtrace

  def hvp(p, b):
    grad = lambda q: jax.grad(loss_fn)(q, b)  # noqa: E731
    return lambda v: jax.jvp(grad, (p,), (v,))[1]

  def lanczos(p, b, key):
    flat, unravel = ravel_pytree(p)
    matvec = lambda v: ravel_pytree(hvp(p, b)(unravel(v)))[0]  # noqa: E731
    v0 = jax.random.normal(key, flat.shape)
    basis, (diagonal, off_diagonal), *_ = decomp.tridiag_sym(22, materialize=False)(
      matvec, v0 / jnp.linalg.norm(v0)
    )
    tridiagonal = jnp.diag(diagonal) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
    return basis, tridiagonal, unravel

  def eigenvalues(p, b, key):
    return jnp.linalg.eigvalsh(lanczos(p, b, key)[1])[-1]

  def eigenpair(p, b, key):
    basis, tridiagonal, unravel = lanczos(p, b, key)
    values, vectors = jnp.linalg.eigh(tridiagonal)
    return values[-1], unravel(vectors[:, -1] @ basis)

  def trace(p, b, key):
    sampler = stochtrace.sampler_signs(p, num=60)
    estimate = stochtrace.estimator_monte_carlo_mean_and_sem(
      stochtrace.monte_carlo_trace(), sampler
    )
    return estimate(hvp(p, b), key)

  def density(p, b, key):
    integrand = funm.monte_carlo_funm_sym(
      funm.dense_funm_sym_eigh(lambda x: x), decomp.tridiag_sym(32)
    )
    sampler = stochtrace.sampler_signs(p, num=4)
    return stochtrace.estimator_monte_carlo(integrand, sampler)(hvp(p, b), key)

  calls = {'eigenvalues': eigenvalues, 'eigenpair': eigenpair, 'trace': trace, 'density': density}
  return jax.jit(calls[quantity])


def one(library, quantity, later_calls, hidden_layers=2, width=32):
  """Times one (library, quantity) in this process; returns first and median later seconds."""
  import jax

  loss_fn, params, batch = problem(hidden_layers, width)
  if library == 'matfree':
    call = matfree_call(quantity, loss_fn)
  else:  # the default layout ('auto': raveled here, on one device), or leaf by leaf
    call = optax_sam_call(quantity, loss_fn, 'tree' if library == 'optax_sam tree' else 'auto')
  key = jax.random.key(1)
  start = time.perf_counter()
  jax.block_until_ready(call(params, batch, key=key))
  first = time.perf_counter() - start
  later = []
  for i in range(later_calls):
    start = time.perf_counter()
    jax.block_until_ready(call(params, batch, key=jax.random.key(2 + i)))
    later.append(time.perf_counter() - start)
  return {'first_s': first, 'later_s': statistics.median(later)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=3, help='fresh processes per case')
  parser.add_argument('--later-calls', type=int, default=5)
  parser.add_argument(
    '--hidden-layers',
    type=int,
    default=2,
    help='hidden tanh layers (2: the 2,698-parameter MLP with 6 leaves)',
  )
  parser.add_argument(
    '--width', type=int, default=32, help='hidden width (300: 105,610 parameters)'
  )
  parser.add_argument('--quantities', nargs='+', default=list(QUANTITIES), choices=QUANTITIES)
  parser.add_argument('--libraries', nargs='+', default=list(LIBRARIES), choices=LIBRARIES)
  parser.add_argument('--one', nargs=2, metavar=('LIBRARY', 'QUANTITY'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(one(*args.one, args.later_calls, args.hidden_layers, args.width)))
    return
  results = {}
  for repeat in range(args.repeats):
    for quantity in args.quantities:
      # Alternate which library goes first, so slow spells of the machine fall on both.
      for library in args.libraries if repeat % 2 == 0 else args.libraries[::-1]:
        command = [sys.executable, '-m', 'benchmarks.curvature_first_call', '--one', library,
                   quantity, '--later-calls', str(args.later_calls),
                   '--hidden-layers', str(args.hidden_layers),
                   '--width', str(args.width)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
          print(f'{library} {quantity} failed:\n{done.stderr[-2000:]}', file=sys.stderr)
          continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.setdefault((quantity, library), []).append(result)
        print(f'repeat {repeat + 1}/{args.repeats}: {library} {quantity} {result}', flush=True)
  print('\n| quantity | library | first call, s (min-max) | later call, ms (median) |')
  print('|---|---|---|---|')
  for (quantity, library), runs in results.items():
    first = [r['first_s'] for r in runs]
    later = statistics.median(r['later_s'] for r in runs)
    print(f'| {quantity} | {library} | {min(first):.2f}-{max(first):.2f} | {1e3 * later:.1f} |')


if __name__ == '__main__':
  main()
