"""Curvature estimators beside matfree and traceax: bias, spread, error-bar coverage, time.

Runs each estimator with the same budget of products on dense symmetric positive definite test
matrices ``Q diag(i^-decay) Q^T`` with known answers, over many seeds (``jax.lax.map``), and prints
one markdown table per quantity:

- the trace (Hutchinson, Hutch++, XTrace, XNysTrace; ``--probes`` products);
- the diagonal (Hutchinson, XDiag; ``--probes`` products), entry by entry;
- the log-determinant by stochastic Lanczos quadrature (``--slq-probes`` probes of ``--slq-steps``
  Lanczos steps each; traceax has no SLQ).

Columns: the bias and the spread of the estimates over the seeds relative to the exact value (for
the diagonal, the root mean square over entries of each, relative to that of the diagonal); how
often the exact value lies within 2 reported standard errors; the root mean square of the reported
standard error over that of the actual error (1 is calibrated, below 1 optimistic); and the time per
call. matfree and traceax are optional (``pip install -e '.[peers]'``); a missing one is skipped.

    python -m benchmarks.curvature_peers --n 400 --probes 60 --seeds 200
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from optax_sam import sharpness


def test_matrix(n, decay, seed=0):
  """``Q diag(lambda) Q^T`` with ``lambda_i = i^-decay`` (float64)."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return jnp.asarray((q * np.arange(1.0, n + 1.0) ** -decay) @ q.T)


def exact_values(a):
  return {
    'trace': float(jnp.trace(a)),
    'diagonal': np.asarray(jnp.diagonal(a)),
    'logdet': float(jnp.linalg.slogdet(a)[1]),
  }


# Each estimator is (name, run) with run(a, key, budget) -> (estimate, stderr); budget is
# args.probes for the trace and the diagonal and (probes, steps) for SLQ.


def ours(args):
  def trace(method):
    def run(a, key, probes):
      r = sharpness.trace(
        lambda v: a @ v, jnp.zeros(a.shape[0]), key=key, num_probes=probes, method=method
      )
      return r.estimate, r.stderr

    return f'optax_sam {method}', run

  def diagonal(method):
    def run(a, key, probes):
      r = sharpness.diagonal(
        lambda v: a @ v, jnp.zeros(a.shape[0]), key=key, num_probes=probes, method=method
      )
      return r.estimate, r.stderr

    return f'optax_sam {method}', run

  def logdet(a, key, budget):
    probes, steps = budget
    density = sharpness.spectral_density(
      lambda v: a @ v, jnp.zeros(a.shape[0]), key=key, num_probes=probes, num_steps=steps
    )
    r = sharpness.spectral_sum(density, jnp.log, dim=a.shape[0])
    return r.estimate, r.stderr

  return {
    'trace': [trace(m) for m in ('hutchinson', 'hutch++', 'xtrace', 'xnystrace')],
    'diagonal': [diagonal(m) for m in ('hutchinson', 'xdiag')],
    'logdet': [('optax_sam slq', logdet)],
  }


def matfree_estimators():
  try:
    from matfree import decomp, funm, stochtrace
  except ImportError:
    return {}

  def make(name, integrand, loo, num=lambda budget: budget):
    def run(a, key, budget):
      sampler = stochtrace.sampler_signs(jnp.zeros(a.shape[0]), num=num(budget))
      build = (
        stochtrace.estimator_leave_one_out_mean_and_sem
        if loo
        else stochtrace.estimator_monte_carlo_mean_and_sem
      )
      return build(integrand(budget), sampler)(lambda v: a @ v, key)

    return f'matfree {name}', run

  half = lambda probes: probes // 2  # noqa: E731 (the leave-one-out methods use 2 products a probe)
  return {
    'trace': [
      make('hutchinson', lambda _: stochtrace.monte_carlo_trace(), False),
      make('xtrace', lambda _: stochtrace.leave_one_out_xtrace(), True, half),
      make('xnystrace', lambda _: stochtrace.leave_one_out_xnystrace(), True),
    ],
    'diagonal': [
      make('hutchinson', lambda _: stochtrace.monte_carlo_diagonal(), False),
      make('xdiag', lambda _: stochtrace.leave_one_out_xdiag(), True, half),
    ],
    'logdet': [
      make(
        'slq',
        lambda budget: funm.monte_carlo_funm_sym_logdet(decomp.tridiag_sym(budget[1])),
        False,
        lambda budget: budget[0],
      )
    ],
  }


def traceax_estimators():
  try:
    import lineax
    import traceax
  except ImportError:
    return {}

  def make(name, estimator):
    def run(a, key, probes):
      operator = lineax.MatrixLinearOperator(a, lineax.positive_semidefinite_tag)
      estimate, stats = estimator.estimate(key, operator, probes)
      return estimate, stats.get('std.err', jnp.nan)

    return f'traceax {name}', run

  sampler = traceax.RademacherSampler(jnp.float64)
  return {
    'trace': [
      make('hutchinson', traceax.HutchinsonEstimator(sampler)),
      make('hutch++', traceax.HutchPlusPlusEstimator(sampler)),
      make('xtrace', traceax.XTraceEstimator()),
      make('xnystrace', traceax.XNysTraceEstimator()),
    ]
  }


def summarize(estimate, stderr, exact):
  """Bias, spread, 2-stderr coverage and RMS stderr / RMS error, relative to the exact value."""
  estimate, stderr, exact = np.asarray(estimate), np.asarray(stderr), np.asarray(exact)
  errors = estimate - exact
  scale = np.sqrt(np.mean(exact**2))
  bias = np.mean(errors, axis=0)
  bias = (np.mean(bias) if bias.ndim == 0 else np.sqrt(np.mean(bias**2))) / scale
  spread = np.sqrt(np.mean(np.var(estimate, axis=0))) / scale
  if not np.all(np.isfinite(stderr)):
    return bias, spread, np.nan, np.nan
  covered = np.mean(np.abs(errors) < 2 * stderr)
  ratio = np.sqrt(np.mean(stderr**2) / np.mean(errors**2))
  return bias, spread, covered, ratio


def measure(run, a, keys, budget):
  """The estimates and stderrs over the seeds, and the milliseconds per call."""
  # lax.map over the seeds, not vmap: XLA:CPU sometimes hangs running hundreds of batched
  # Cholesky factors at once.
  call = jax.jit(lambda keys: jax.lax.map(lambda key: run(a, key, budget), keys))
  jax.block_until_ready(call(keys))
  start = time.perf_counter()
  estimate, stderr = jax.block_until_ready(call(keys))
  return estimate, stderr, 1e3 * (time.perf_counter() - start) / keys.shape[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--n', type=int, default=400)
  parser.add_argument('--probes', type=int, default=60, help='products for trace and diagonal')
  parser.add_argument('--slq-probes', type=int, default=10)
  parser.add_argument('--slq-steps', type=int, default=30)
  parser.add_argument('--seeds', type=int, default=200)
  parser.add_argument('--decays', type=float, nargs='+', default=[0.5, 1.0, 2.0])
  parser.add_argument(
    '--quantities', nargs='+', default=['trace', 'diagonal', 'logdet'],
    choices=['trace', 'diagonal', 'logdet'],
  )  # fmt: skip
  args = parser.parse_args()
  jax.config.update('jax_enable_x64', True)
  families = [ours(args), matfree_estimators(), traceax_estimators()]
  keys = jax.random.split(jax.random.key(0), args.seeds)
  matrices = {decay: test_matrix(args.n, decay) for decay in args.decays}
  budgets = {
    'trace': args.probes,
    'diagonal': args.probes,
    'logdet': (args.slq_probes, args.slq_steps),
  }
  print(f'n = {args.n}, {args.seeds} seeds, float64, {jax.devices()[0]}')
  for quantity in args.quantities:
    budget = budgets[quantity]
    print(f'\n### {quantity}, budget {budget}\n')
    print('| spectrum | estimator | rel. bias | rel. spread | within 2 stderr '
          '| stderr / error | ms / call |')  # fmt: skip
    print('|---|---|---|---|---|---|---|')
    for decay, a in matrices.items():
      exact = exact_values(a)[quantity]
      for name, run in [e for family in families for e in family.get(quantity, [])]:
        try:
          estimate, stderr, ms = measure(run, a, keys, budget)
        except Exception as error:  # noqa: BLE001 (a peer's API may differ across versions)
          print(f'| i^-{decay:g} | {name} | failed: {type(error).__name__} | | | | |', flush=True)
          continue
        bias, spread, covered, ratio = summarize(estimate, stderr, exact)
        print(
          f'| i^-{decay:g} | {name} | {bias:+.1e} | {spread:.1e} | {covered:.0%} | {ratio:.2f}'
          f' | {ms:.2f} |',
          flush=True,
        )


if __name__ == '__main__':
  main()
