"""benchmarks/curvature_peers.py and curvature_first_call.py: the summary statistics, and tiny runs.

The peers (matfree, traceax: ``pip install -e '.[peers]'``) are optional; without them the
scripts run optax_sam's rows alone. Timing is reported, never asserted.
"""

import subprocess
import sys

import jax
import numpy as np

from benchmarks import curvature_first_call, curvature_peers


def test_summarize_on_known_numbers():
  exact = np.array([1.0, -1.0])
  estimate = np.array([[1.5, -1.0], [0.5, -0.5]])  # errors [[0.5, 0], [-0.5, 0.5]]
  stderr = np.array([[0.2, 0.1], [0.5, 0.1]])
  bias, spread, covered, ratio = curvature_peers.summarize(estimate, stderr, exact)
  np.testing.assert_allclose(bias, np.sqrt((0.0**2 + 0.25**2) / 2))  # RMS of mean errors
  np.testing.assert_allclose(spread, np.sqrt((0.25 + 0.0625) / 2))  # RMS of the variances
  assert covered == 0.5  # 0 < 0.2 and 0.5 < 1.0 fall within 2 stderr; 0.5 > 0.4, 0.5 > 0.2 do not
  np.testing.assert_allclose(ratio, np.sqrt(np.mean(stderr**2) / (0.75 / 4)))
  # A peer without an error estimate reports none.
  assert np.isnan(curvature_peers.summarize(estimate, np.full(2, np.nan), exact)[2])


def run(*args):
  done = subprocess.run(
    [sys.executable, '-m', *args], capture_output=True, text=True, check=True, timeout=600
  )
  return done.stdout


def test_a_tiny_side_by_side_run_reports_every_estimator_of_ours():
  out = run(
    'benchmarks.curvature_peers', '--n', '24', '--probes', '8', '--seeds', '4', '--decays', '2',
    '--slq-probes', '2', '--slq-steps', '4', '--quantities', 'diagonal', 'logdet',
  )  # fmt: skip
  for name in ('optax_sam hutchinson', 'optax_sam xdiag', 'optax_sam slq'):
    row = next(line for line in out.splitlines() if f'| {name} |' in line)
    assert 'failed' not in row, row
  assert 'failed' not in out, out


def test_first_call_timing_runs_in_fresh_processes():
  out = run(
    'benchmarks.curvature_first_call', '--repeats', '1', '--later-calls', '1',
    '--quantities', 'trace', '--libraries', 'optax_sam', 'optax_sam tree',
  )  # fmt: skip
  for library in ('optax_sam', 'optax_sam tree'):
    row = next(line for line in out.splitlines() if line.startswith(f'| trace | {library} |'))
    first, later = (float(x.split('-')[0]) for x in row.split('|')[3:5])
    assert first > 0 and later > 0


def test_first_call_problem_sizes():
  def size(*args):
    return sum(x.size for x in jax.tree.leaves(curvature_first_call.problem(*args)[1]))

  assert size() == 2698 and size(24) == 25930 and size(2, 300) == 105610
  assert len(jax.tree.leaves(curvature_first_call.problem(2, 300)[1])) == 6
