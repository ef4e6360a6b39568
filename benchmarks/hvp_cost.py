"""What the sharpness diagnostics cost, and how they compare with PyHessian's defaults.

Run from the repository root::

  python -m benchmarks.hvp_cost                  # the example's CNN and the benchmark MLP
  python -m benchmarks.hvp_cost --quick          # tiny models, few rounds (used in the tests)
  python -m benchmarks.hvp_cost --out /tmp/hvp   # writes hvp_cost.json and hvp_cost.md there

Three parts:

1. *One Hessian-vector product against one gradient*, measured side by side
   in one process on the example's residual CNN (``optax_sam.examples.models
   .ResNet``, NNX, eval mode through :func:`optax_sam.flax.nnx_loss_fn`, on
   MNIST-1D-shaped inputs of length 40) and on the benchmark MLP
   (``benchmarks.models.mlp``, 784-512-512-10). Each case is jitted, warmed
   up, then timed in interleaved rounds (the order rotates from round to
   round, so machine noise falls on all cases alike); the ratio is the median
   over rounds of the per-round ratio. Target: an HVP within 2.5x a gradient.
2. *The default budgets*: one call of every function of
   :mod:`optax_sam.sharpness` with its default budget, as a multiple of one
   gradient (fewer rounds; these are long calls).
3. *Accuracy and HVP count against PyHessian's defaults* on one quadratic with
   a known spectrum: PyHessian's power iteration (``maxIter=100``, stop when
   the eigenvalue changes by less than ``tol=1e-3`` relatively) and its
   Hutchinson trace (stop when the running mean changes by less than 1e-3
   relatively, at most 100 probes), re-implemented here from its source
   (``pyhessian/hessian.py``), against :func:`hessian_eigenvalues` and
   :func:`hessian_trace` with their defaults, over many seeds. This part is
   deterministic (no timing).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import models as bench_models
from optax_sam import sharpness
from optax_sam._src.diagnostics import hessian_spectrum, trace_estimators
from optax_sam._src.diagnostics import hvp as hvp_lib

HVP_TARGET = 2.5

# Nominal cost of each default call, in Hessian-vector products (HVP), gradients and losses.
DEFAULT_CALLS = {
  'hessian_eigenvalues (k=1, 22 steps)': '22 HVP',
  'hessian_trace (hutchinson, 60 probes)': '60 HVP',
  'hessian_trace (hutch++, 60 probes)': '60 HVP',
  'hessian_spectral_density (4 probes x 32 steps)': '128 HVP',
  'sam_sharpness': '1 gradient + 1 loss',
  'average_sharpness (32 samples)': '33 losses',
  'worst_case_sharpness (20 steps)': '20 gradients + 2 losses',
}


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def cnn_problem(quick: bool) -> dict:
  """The example's ResNet on MNIST-1D-shaped data, as ``loss_fn(params, batch)``."""
  from flax import nnx

  import optax_sam.flax
  from optax_sam.examples import models as example_models

  widths = (8, 16, 32) if quick else (32, 64, 128)
  batch_size = 32 if quick else 128
  model = example_models.ResNet(10, in_channels=1, ndim=1, widths=widths, rngs=nnx.Rngs(0))
  loss = lambda m, batch: _cross_entropy(m(batch[0]), batch[1])
  loss_fn, params = optax_sam.flax.nnx_loss_fn(loss, model, train=False)
  kx, ky = jax.random.split(jax.random.key(1))
  batch = (jax.random.normal(kx, (batch_size, 40, 1)), jax.random.randint(ky, (batch_size,), 0, 10))
  return {
    'name': 'cnn',
    'description': f'example ResNet (NNX, BatchNorm, eval mode), widths {widths}, '
    f'input 40x1, batch {batch_size}',
    'loss_fn': loss_fn,
    'params': params,
    'batch': batch,
  }


def mlp_problem(quick: bool) -> dict:
  """The benchmark MLP, as ``loss_fn(params, batch)``."""
  model = bench_models.mlp(width=32 if quick else 512, batch_size=32 if quick else 128)
  params, state = model.init(jax.random.key(0))
  loss_fn = lambda p, batch: model.loss(p, state, batch)[0]
  return {
    'name': 'mlp',
    'description': f'{model.description}, batch {model.batch_size}',
    'loss_fn': loss_fn,
    'params': params,
    'batch': model.batch(jax.random.key(1)),
  }


def _param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _time_rounds(
  cases: dict[str, Callable[[], Any]], rounds: int, reps: int, warmup: bool = True
) -> dict:
  """Seconds per call of each case, per round, in rotated interleaved order.

  With ``warmup=False`` the cases must already be compiled (``jit(...).lower(...).compile()``).
  """
  names = list(cases)
  times = {name: [] for name in names}
  for name in names if warmup else ():  # warm up (compile)
    jax.block_until_ready(cases[name]())
  for r in range(rounds):
    order = names[r % len(names) :] + names[: r % len(names)]
    if r % 2:
      order = order[::-1]
    for name in order:
      start = time.perf_counter()
      for _ in range(reps):
        out = cases[name]()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / reps)
  return times


def _ratio(times: dict, name: str, ref: str) -> float:
  return float(np.median(np.asarray(times[name]) / np.asarray(times[ref])))


def measure_costs(problem: dict, rounds: int, reps: int, budget_rounds: int) -> dict:
  """Gradient and HVP times, and the default budgets' times as multiples of a gradient."""
  loss_fn, params, batch = problem['loss_fn'], problem['params'], problem['batch']
  key = jax.random.key(0)
  v = hvp_lib.random_like(key, params, 'normal')
  grad = jax.jit(jax.grad(loss_fn))
  hvp = jax.jit(lambda p, b, v: hvp_lib.hvp_fn(loss_fn, p, b)(v))
  core = _time_rounds(
    {'gradient': lambda: grad(params, batch), 'hvp': lambda: hvp(params, batch, v)}, rounds, reps
  )
  budgets = {
    'hessian_eigenvalues (k=1, 22 steps)': lambda p, b: sharpness.hessian_eigenvalues(
      loss_fn, p, b, key=key
    ),
    'hessian_trace (hutchinson, 60 probes)': lambda p, b: sharpness.hessian_trace(
      loss_fn, p, b, key=key
    ),
    'hessian_trace (hutch++, 60 probes)': lambda p, b: sharpness.hessian_trace(
      loss_fn, p, b, key=key, method='hutch++'
    ),
    'hessian_spectral_density (4 probes x 32 steps)': lambda p, b: (
      sharpness.hessian_spectral_density(loss_fn, p, b, key=key)
    ),
    'sam_sharpness': lambda p, b: sharpness.sam_sharpness(loss_fn, p, b),
    'average_sharpness (32 samples)': lambda p, b: sharpness.average_sharpness(
      loss_fn, p, b, key=key
    ),
    'worst_case_sharpness (20 steps)': lambda p, b: sharpness.worst_case_sharpness(
      loss_fn, p, b, key=key
    ),
  }
  # Compiled ahead of time, so that each long call runs only for the timed rounds.
  compiled = {name: jax.jit(f).lower(params, batch).compile() for name, f in budgets.items()}
  compiled_grad = grad.lower(params, batch).compile()
  cases = {'gradient': lambda: compiled_grad(params, batch)}
  cases.update({name: (lambda f=f: f(params, batch)) for name, f in compiled.items()})
  budget_times = _time_rounds(cases, budget_rounds, 1, warmup=False)
  return {
    'name': problem['name'],
    'description': problem['description'],
    'param_count': _param_count(params),
    'rounds': rounds,
    'reps': reps,
    'gradient_ms': 1e3 * float(np.median(core['gradient'])),
    'hvp_ms': 1e3 * float(np.median(core['hvp'])),
    'hvp_over_gradient': _ratio(core, 'hvp', 'gradient'),
    'hvp_over_gradient_per_round': [
      float(h / g) for h, g in zip(core['hvp'], core['gradient'], strict=True)
    ],
    'budgets': [
      {
        'call': name,
        'nominal': DEFAULT_CALLS[name],
        'ms': 1e3 * float(np.median(budget_times[name])),
        'gradients': _ratio(budget_times, name, 'gradient'),
      }
      for name in budgets
    ],
  }


# ------------------------------------------------------------------ PyHessian's defaults


def pyhessian_power_iteration(hvp: Callable, v: np.ndarray, max_iter=100, tol=1e-3):
  """PyHessian's ``eigenvalues(maxIter=100, tol=1e-3, top_n=1)``: returns (eigenvalue, HVPs)."""
  v = v / np.linalg.norm(v)
  eigenvalue = None
  count = 0
  for _ in range(max_iter):
    hv = hvp(v)
    count += 1
    tmp = float(v @ hv)
    v = hv / np.linalg.norm(hv)
    if eigenvalue is None:
      eigenvalue = tmp
    elif abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < tol:
      break
    else:
      eigenvalue = tmp
  return eigenvalue, count


def pyhessian_trace(hvp: Callable, rng: np.random.Generator, n: int, max_iter=100, tol=1e-3):
  """PyHessian's ``trace(maxIter=100, tol=1e-3)``: returns (mean of samples, HVPs)."""
  samples = []
  trace = 0.0
  for _ in range(max_iter):
    z = rng.choice([-1.0, 1.0], size=n)
    samples.append(float(z @ hvp(z)))
    if abs(np.mean(samples) - trace) / (abs(trace) + 1e-6) < tol:
      return float(np.mean(samples)), len(samples)
    trace = float(np.mean(samples))
  return float(np.mean(samples)), len(samples)


def comparison_spectrum(n: int) -> np.ndarray:
  """A few outliers above a bulk, as in trained networks' Hessians (Ghorbani et al.)."""
  bulk = np.random.default_rng(0).uniform(-0.2, 1.0, n - 5)
  return np.concatenate([[10.0, 9.0, 8.0, 7.0, 6.0], bulk])


def compare_with_pyhessian(n: int, seeds: int) -> dict:
  """Relative errors and HVP counts over ``seeds`` runs on one float32 quadratic."""
  spectrum = comparison_spectrum(n)
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(n, n)))
  h = ((q * spectrum) @ q.T).astype(np.float32)
  lam, trace = float(spectrum.max()), float(spectrum.sum())
  h_j = jnp.asarray(h)
  shapes = {'kernel': (n // 10, 8), 'bias': (n - 8 * (n // 10),)}  # a pytree of two leaves
  params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}

  def loss_fn(p, batch):
    f = jnp.concatenate([p['kernel'].ravel(), p['bias']])
    return 0.5 * f @ h_j @ f

  keys = jax.random.split(jax.random.key(0), seeds)
  ours_eig = jax.jit(
    jax.vmap(lambda k: sharpness.hessian_eigenvalues(loss_fn, params, None, key=k).eigenvalues[0])
  )(keys)
  ours_trace = jax.jit(jax.vmap(lambda k: sharpness.hessian_trace(loss_fn, params, None, key=k)))(
    keys
  )
  ours_pp = jax.jit(
    jax.vmap(lambda k: sharpness.hessian_trace(loss_fn, params, None, key=k, method='hutch++'))
  )(keys)
  hvp = lambda v: h @ v.astype(np.float32)
  py_eig, py_eig_n, py_tr, py_tr_n = [], [], [], []
  for s in range(seeds):
    rng = np.random.default_rng(100 + s)
    value, count = pyhessian_power_iteration(hvp, rng.normal(size=n).astype(np.float32))
    py_eig.append(value)
    py_eig_n.append(count)
    value, count = pyhessian_trace(hvp, rng, n)
    py_tr.append(value)
    py_tr_n.append(count)

  def summary(values, exact, counts, stderr=None):
    err = np.abs(np.asarray(values, np.float64) - exact) / abs(exact)
    out = {
      'median_rel_error': float(np.median(err)),
      'p90_rel_error': float(np.percentile(err, 90)),
      'max_rel_error': float(np.max(err)),
      'mean_hvps': float(np.mean(counts)),
      'max_hvps': int(np.max(counts)),
    }
    if stderr is not None:
      stderr = np.asarray(stderr, np.float64)
      out['coverage_2_stderr'] = float(np.mean(np.abs(np.asarray(values) - exact) < 2 * stderr))
      out['median_rel_stderr'] = float(np.median(stderr / abs(exact)))
    return out

  eig_steps = hessian_spectrum.DEFAULT_EIGEN_STEPS
  probes = trace_estimators.DEFAULT_TRACE_PROBES
  return {
    'n': n,
    'seeds': seeds,
    'spectrum': 'eigenvalues 10, 9, 8, 7, 6 and a bulk uniform in [-0.2, 1], float32',
    'lambda_max': lam,
    'exact_trace': trace,
    'top_eigenvalue': {
      'pyhessian power iteration (maxIter=100, tol=1e-3)': summary(py_eig, lam, py_eig_n),
      f'hessian_eigenvalues (Lanczos, {eig_steps + 2} steps, residual from the recurrence)': (
        summary(ours_eig, lam, [eig_steps + 2] * seeds)
      ),
    },
    'trace': {
      'pyhessian Hutchinson (maxIter=100, tol=1e-3)': summary(py_tr, trace, py_tr_n),
      f'hessian_trace (hutchinson, {probes} probes)': summary(
        ours_trace.estimate, trace, [probes] * seeds, ours_trace.stderr
      ),
      f'hessian_trace (hutch++, {probes} probes)': summary(
        ours_pp.estimate, trace, [probes] * seeds, ours_pp.stderr
      ),
    },
  }


# ------------------------------------------------------------------ report


def environment(argv: Sequence[str]) -> dict:
  device = jax.devices()[0]
  try:
    load = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    load = None
  return {
    'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    'command': shlex.join(['python', '-m', 'benchmarks.hvp_cost', *argv]),
    'platform': device.platform,
    'device': device.device_kind,
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'load_average_at_start': load,
  }


def markdown(report: dict) -> str:
  env = report['environment']
  lines = [
    f'Measured {env["date"]} with `{env["command"]}` on {env["platform"]} '
    f'({env["device"]}, {env["cpu_count"]} CPUs, load average at start '
    f'{env["load_average_at_start"]}), jax {env["jax"]}.',
    '',
    f'| model | parameters | gradient ms | HVP ms | HVP / gradient (<= {HVP_TARGET}) |',
    '|---|---|---|---|---|',
  ]
  for m in report['models']:
    verdict = 'PASS' if m['hvp_over_gradient'] <= HVP_TARGET else 'MISS'
    lines.append(
      f'| {m["name"]}: {m["description"]} | {m["param_count"]:,} | {m["gradient_ms"]:.2f} | '
      f'{m["hvp_ms"]:.2f} | {m["hvp_over_gradient"]:.2f}x {verdict} |'
    )
  if report['models']:
    lines += [
      '',
      '| default call | nominal cost | '
      + ' | '.join(f'{m["name"]}: gradients' for m in report['models'])
      + ' |',
      '|---|---|' + '---|' * len(report['models']),
    ]
    for i, b in enumerate(report['models'][0]['budgets']):
      cells = ' | '.join(f'{m["budgets"][i]["gradients"]:.1f}' for m in report['models'])
      lines.append(f'| `{b["call"]}` | {b["nominal"]} | {cells} |')
  c = report['pyhessian']
  lines += [
    '',
    f"Against PyHessian's defaults on a quadratic with n = {c['n']} parameters "
    f'({c["spectrum"]}; lambda_max = {c["lambda_max"]:g}, trace = {c["exact_trace"]:.2f}), '
    f'{c["seeds"]} seeds:',
    '',
    '| estimate | method | median rel. error | 90th pct | max | HVPs (mean / max) | '
    'within 2 stderr |',
    '|---|---|---|---|---|---|---|',
  ]
  for what in ('top_eigenvalue', 'trace'):
    for method, s in c[what].items():
      cover = f'{100 * s["coverage_2_stderr"]:.0f}%' if 'coverage_2_stderr' in s else 'no error bar'
      lines.append(
        f'| {what.replace("_", " ")} | {method} | {s["median_rel_error"]:.1e} | '
        f'{s["p90_rel_error"]:.1e} | {s["max_rel_error"]:.1e} | '
        f'{s["mean_hvps"]:.1f} / {s["max_hvps"]} | {cover} |'
      )
  return '\n'.join(lines) + '\n'


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny models and few rounds')
  parser.add_argument('--models', default='cnn,mlp', help='comma-separated: cnn, mlp')
  parser.add_argument('--out', default=None, help='folder for hvp_cost.json and hvp_cost.md')
  args = parser.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m]
  bad = set(args.models) - {'cnn', 'mlp'}
  if bad:
    parser.error(f'unknown models {sorted(bad)}; choose from cnn, mlp')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
  argv = list(argv) if argv is not None else None
  args = parse_args(argv if argv is not None else None)
  shown = argv if argv is not None else __import__('sys').argv[1:]
  rounds, reps, budget_rounds = (3, 2, 1) if args.quick else (9, 3, 1)
  problems = {'cnn': cnn_problem, 'mlp': mlp_problem}
  report = {'environment': environment(shown), 'quick': args.quick, 'models': []}

  def save(name, text):
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, name), 'w') as f:
        f.write(text)

  n, seeds = (200, 20) if args.quick else (2000, 100)
  report['pyhessian'] = compare_with_pyhessian(n, seeds)
  for name in args.models:
    problem = problems[name](args.quick)
    report['models'].append(measure_costs(problem, rounds, reps, budget_rounds))
    save('hvp_cost.json', json.dumps(report, indent=1))  # after each model, in case of a stop
  text = markdown(report)
  print(text)
  save('hvp_cost.md', text)
  return report


if __name__ == '__main__':
  main()
