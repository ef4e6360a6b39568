"""benchmarks/hvp_cost.py: the re-implementation of PyHessian's defaults and the comparison.

Only the deterministic part is tested (accuracy and HVP counts); timing is reported, never
asserted.
"""

import numpy as np

from benchmarks import hvp_cost


def test_pyhessian_power_iteration_stops_on_its_tolerance():
  h = np.diag([2.0, 1.0, 0.5])
  calls = []

  def hvp(v):
    calls.append(1)
    return h @ v

  value, count = hvp_cost.pyhessian_power_iteration(hvp, np.ones(3))
  assert count == len(calls) <= 100
  # It stops when the Rayleigh quotient changes by less than 1e-3, short of convergence.
  assert 1e-6 < abs(value - 2.0) / 2.0 < 1e-2
  value, count = hvp_cost.pyhessian_power_iteration(hvp, np.ones(3), tol=1e-12)
  np.testing.assert_allclose(value, 2.0, rtol=1e-9)


def test_pyhessian_trace_is_exact_on_a_diagonal_and_stops_after_two_probes():
  h = np.diag([3.0, 1.0, 2.0])
  value, count = hvp_cost.pyhessian_trace(lambda v: h @ v, np.random.default_rng(0), 3)
  assert value == 6.0 and count == 2  # the second sample leaves the mean unchanged


def test_comparison_with_pyhessian_defaults():
  c = hvp_cost.compare_with_pyhessian(n=200, seeds=10)
  eig = c['top_eigenvalue']
  ours = eig['hessian_eigenvalues (Lanczos, 22 steps, residual from the recurrence)']
  theirs = eig['pyhessian power iteration (maxIter=100, tol=1e-3)']
  assert ours['max_rel_error'] < 1e-4  # float32 Lanczos: converged
  assert theirs['median_rel_error'] > 100 * ours['max_rel_error']  # it stops short, at ~0.4%
  assert ours['mean_hvps'] == 22 and 2 <= theirs['mean_hvps'] <= 100
  trace = c['trace']
  assert 'coverage_2_stderr' not in trace['pyhessian Hutchinson (maxIter=100, tol=1e-3)']
  for name in ('hessian_trace (hutchinson, 60 probes)', 'hessian_trace (hutch++, 60 probes)'):
    assert 0 < trace[name]['median_rel_stderr'] < 0.2
    assert trace[name]['mean_hvps'] == 60
  markdown = hvp_cost.markdown(
    {
      'environment': hvp_cost.environment(['--quick']),
      'models': [],
      'pyhessian': c,
    }
  )
  assert 'pyhessian power iteration' in markdown
