"""Trace estimators side by side with matfree and traceax: bias, spread, error-bar coverage, time.

Runs every estimator with the same budget of products on dense symmetric positive semi-definite
test matrices with known traces, over many seeds (``jax.vmap``), and prints a markdown table.
matfree and traceax are optional (``pip install matfree traceax``); a missing one is skipped.

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


def ours(method):
  def run(a, key, probes):
    r = sharpness.trace(
      lambda v: a @ v, jnp.zeros(a.shape[0]), key=key, num_probes=probes, method=method
    )
    return r.estimate, r.stderr

  return f'optax_sam {method}', run


def matfree_estimators():
  try:
    from matfree import stochtrace
  except ImportError:
    return []

  def make(name, integrand, loo):
    def run(a, key, probes):
      num = probes // 2 if name == 'xtrace' else probes
      sampler = stochtrace.sampler_signs(jnp.zeros(a.shape[0]), num=num)
      build = (
        stochtrace.estimator_leave_one_out_mean_and_sem
        if loo
        else stochtrace.estimator_monte_carlo_mean_and_sem
      )
      return build(integrand, sampler)(lambda v: a @ v, key)

    return f'matfree {name}', run

  return [
    make('hutchinson', stochtrace.monte_carlo_trace(), False),
    make('xtrace', stochtrace.leave_one_out_xtrace(), True),
    make('xnystrace', stochtrace.leave_one_out_xnystrace(), True),
  ]


def traceax_estimators():
  try:
    import lineax
    import traceax
  except ImportError:
    return []

  def make(name, estimator):
    def run(a, key, probes):
      operator = lineax.MatrixLinearOperator(a, lineax.positive_semidefinite_tag)
      estimate, stats = estimator.estimate(key, operator, probes)
      return estimate, stats.get('std.err', jnp.nan)

    return f'traceax {name}', run

  sampler = traceax.RademacherSampler(jnp.float64)
  return [
    make('hutchinson', traceax.HutchinsonEstimator(sampler)),
    make('hutch++', traceax.HutchPlusPlusEstimator(sampler)),
    make('xtrace', traceax.XTraceEstimator()),
    make('xnystrace', traceax.XNysTraceEstimator()),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--n', type=int, default=400)
  parser.add_argument('--probes', type=int, default=60)
  parser.add_argument('--seeds', type=int, default=200)
  args = parser.parse_args()
  jax.config.update('jax_enable_x64', True)
  estimators = [ours(m) for m in ('hutchinson', 'hutch++', 'xtrace', 'xnystrace')]
  estimators += matfree_estimators() + traceax_estimators()
  keys = jax.random.split(jax.random.key(0), args.seeds)
  print(f'n = {args.n}, {args.probes} products, {args.seeds} seeds, float64, {jax.devices()[0]}')
  print()
  print('| spectrum | estimator | rel. bias | rel. spread | within 2 stderr | ms / call |')
  print('|---|---|---|---|---|---|')
  for decay in (0.5, 1.0, 2.0):
    a = test_matrix(args.n, decay)
    exact = float(jnp.trace(a))
    for name, run in estimators:
      try:
        # lax.map over the seeds, not vmap: XLA:CPU sometimes hangs running hundreds of batched
        # Cholesky factors at once.
        call = jax.jit(
          lambda keys, run=run, a=a: jax.lax.map(lambda key: run(a, key, args.probes), keys)
        )
        jax.block_until_ready(call(keys))
        start = time.perf_counter()
        estimate, stderr = jax.block_until_ready(call(keys))
        ms = 1e3 * (time.perf_counter() - start) / args.seeds
      except Exception as error:  # noqa: BLE001 (a peer's API may differ across versions)
        print(f'| i^-{decay:g} | {name} | failed: {type(error).__name__} | | | |', flush=True)
        continue
      estimate, stderr = np.asarray(estimate), np.asarray(stderr)
      errors = estimate - exact
      covered = np.mean(np.abs(errors) < 2 * stderr) if np.all(np.isfinite(stderr)) else np.nan
      print(
        f'| i^-{decay:g} | {name} | {np.mean(errors) / exact:+.1e} | {np.std(estimate) / exact:.1e}'
        f' | {covered:.0%} | {ms:.2f} |',
        flush=True,
      )


if __name__ == '__main__':
  main()
