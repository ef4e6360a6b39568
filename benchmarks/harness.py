"""The timing harness of the benchmarks: compiled cases timed in interleaved rounds.

:class:`Runner` compiles one case (``jax.jit`` with donated params and states)
and reads its ``memory_analysis()``; :func:`interleaved` times a list of
runners in rounds whose order rotates (and reverses every other round), so
that machine noise falls on all cases alike; :func:`ratio` and
:func:`bootstrap_ci` turn the per-round times into medians of per-round ratios
with a bootstrap 95% interval. :func:`environment` records the device, the
versions and the commit beside the results. The side-by-side scripts
(:mod:`benchmarks.cheap`, :mod:`benchmarks.micro_batches`) parse their options
with :func:`side_arguments`, tabulate with :func:`side_table` and write with
:func:`save`; :mod:`benchmarks.run` is the main script that uses it.
"""

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import shlex
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases as cases_lib
from benchmarks import models


class Settings(NamedTuple):
  """How long to measure: the same for every case of a model."""

  measure_s: float  # target duration of one measurement (one case, one round)
  budget_s: float  # timed rounds of one model (sweep models: a third; ResNet-18: twice)
  warmup_steps: int  # SAM steps run once after compiling, before the first estimate
  min_rounds: int
  max_rounds: int
  compiler_options: Optional[dict]  # XLA options for compile()


FULL = Settings(
  measure_s=0.05, budget_s=75.0, min_rounds=5, max_rounds=101, warmup_steps=1, compiler_options=None
)
# Quick mode compiles without LLVM optimizations (3x faster to compile; buffer assignment, hence
# memory_analysis, is decided before and is the same), so its timings mean nothing.
QUICK = Settings(
  measure_s=0.002,
  budget_s=0.5,
  min_rounds=3,
  max_rounds=3,
  warmup_steps=1,
  compiler_options={'xla_backend_optimization_level': 0},
)


def default_resnet_batch() -> int:
  """ResNet-18's batch: 128 on an accelerator (the GPU comparison's), 8 on the CPU."""
  return 8 if jax.default_backend() == 'cpu' else 128


def model_specs(quick: bool, resnet_batch: int) -> dict:
  """The models for each ``--models`` choice (the sweep is a list of MLP widths)."""
  if quick:
    return {
      'mlp': [models.mlp(width=32, in_dim=64, batch_size=8)],
      'cnn': [models.cnn1d(channels=8, blocks=1, batch_size=8)],
      # batch 8 like the others: the micro-batch benchmark splits it in groups of 2 and 4
      'resnet18': [models.resnet18(width=4, image_size=8, batch_size=8)],
      'sweep': [models.mlp(width=w, in_dim=64, batch_size=8) for w in (16, 64)],
    }
  return {
    'mlp': [models.mlp(width=512)],
    'cnn': [models.cnn1d(channels=64)],
    'resnet18': [models.resnet18(batch_size=resnet_batch)],
    'sweep': [models.mlp(width=w) for w in (64, 256, 1024, 2048)],
  }


# ----------------------------------------------------------------------------- timing


class Runner:
  """One compiled case with its own (donated) params and states."""

  def __init__(self, case: cases_lib.Case, params, model_state, batch, compiler_options=None):
    self.case = case
    opt_state = case.init(params)
    # Fresh buffers for every argument: a state may alias the params (e.g. a saved copy of the
    # weights made by init), and a buffer must not be donated twice.
    self.args = jax.tree.map(jnp.copy, (params, opt_state, model_state))
    self.batch = batch
    start = time.perf_counter()
    # keep_unused: a state leaf the step never reads (optax.contrib.sam's counter in opaque mode)
    # still occupies memory, so it stays in the argument bytes.
    jitted = jax.jit(case.step, donate_argnums=(0, 1, 2), keep_unused=True)
    self.compiled = jitted.lower(*self.args, batch).compile(compiler_options)
    self.compile_s = time.perf_counter() - start
    stats = self.compiled.memory_analysis()
    self.memory = {
      'argument': int(stats.argument_size_in_bytes),
      'output': int(stats.output_size_in_bytes),
      'alias': int(stats.alias_size_in_bytes),
      'temp': int(stats.temp_size_in_bytes),
      'generated_code': int(stats.generated_code_size_in_bytes),
    }
    self.memory['footprint'] = (
      self.memory['argument'] + self.memory['output'] - self.memory['alias'] + self.memory['temp']
    )

  def run(self, sam_steps: int) -> float:
    """Runs ``sam_steps`` SAM steps and returns the seconds per SAM step."""
    calls = sam_steps * self.case.calls_per_step
    start = time.perf_counter()
    args = self.args
    for _ in range(calls):
      *args, loss = self.compiled(*args, self.batch)
    jax.block_until_ready((args, loss))
    elapsed = time.perf_counter() - start
    self.args = tuple(args)
    return elapsed / sam_steps


def bootstrap_ci(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple:
  """The bootstrap 95% interval of the median of ``values`` (one value: that value twice)."""
  if len(values) < 2:
    return float(values[0]), float(values[0])
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(values), size=(resamples, len(values)))
  medians = np.median(values[picks], axis=1)
  return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def interleaved(runners: list, rounds: int, steps: int, log=None) -> dict[str, list]:
  """Times every runner ``rounds`` times, ``steps`` steps each, interleaved.

  Round ``i`` starts at runner ``i mod n`` and odd rounds run backwards, so no
  case always follows the same other case; the garbage collector is off while
  timing. Returns each case's list of per-step times; ``log`` (if given) gets a
  line every 10 rounds.
  """
  times = {r.case.name: [] for r in runners}
  gc.collect()
  gc.disable()
  try:
    for i in range(rounds):
      order = runners[i % len(runners) :] + runners[: i % len(runners)]
      for runner in order[::-1] if i % 2 else order:
        times[runner.case.name].append(runner.run(steps))
      if log is not None and (i + 1) % 10 == 0:
        log(f'  round {i + 1}/{rounds}')
  finally:
    gc.enable()
  return times


def side_by_side(runners: list, reference: str, settings: Settings, log=print) -> dict:
  """Warms up, sizes and times ``runners`` interleaved; each case's time and ratio to ``reference``.

  Returns ``dict(rounds, steps, cases)`` with ``cases[name]`` holding ``time_ms`` (median),
  ``ratio_vs_<reference>`` (median of per-round ratios), ``ci95`` (bootstrap), ``temp_bytes``
  and ``compile_s``.
  """
  estimate = {}
  for r in runners:
    r.run(settings.warmup_steps)
    estimate[r.case.name] = r.run(1)
  steps = max(1, round(settings.measure_s / estimate[reference]))
  round_s = steps * sum(estimate.values())
  rounds = int(np.clip(settings.budget_s // max(round_s, 1e-9), settings.min_rounds, 101))
  log(f'  timing: {rounds} rounds x {steps} steps per case (~{round_s:.2f} s per round)')
  times = interleaved(runners, rounds, steps, log)
  reference_t = np.asarray(times[reference])
  cases = {}
  for r in runners:
    t = np.asarray(times[r.case.name])
    ratios = t / reference_t
    low, high = bootstrap_ci(ratios)
    cases[r.case.name] = {
      'time_ms': float(np.median(t) * 1e3),
      f'ratio_vs_{reference}': float(np.median(ratios)),
      'ci95': [low, high],
      'temp_bytes': r.memory['temp'],
      'compile_s': r.compile_s,
    }
  return dict(rounds=rounds, steps=steps, cases=cases)


def ratio(by_name: dict, name: str, ref: str) -> dict[str, float]:
  """Median over rounds of ``time(name) / time(ref)`` (same round), with a 95% interval."""
  per_round = np.asarray(by_name[name]['times_ms']) / np.asarray(by_name[ref]['times_ms'])
  low, high = bootstrap_ci(per_round)
  return {'median': float(np.median(per_round)), 'ci95': [low, high]}


# ----------------------------------------------------------------------------- results


def side_arguments(doc: str, out: str, argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """Parses a side-by-side benchmark's options: --quick, --models, --out, --budget."""
  parser = argparse.ArgumentParser(description=doc.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny models, few rounds (seconds)')
  parser.add_argument(
    '--models', default='mlp,cnn', help='comma-separated: mlp, cnn, resnet18 (batch 128 off CPU)'
  )
  parser.add_argument('--out', default=out, help='directory for the .json and .md results')
  parser.add_argument(
    '--budget', type=float, default=None, help='seconds of timed rounds per model (default 75)'
  )
  return parser.parse_args(argv)


def side_settings(args: argparse.Namespace) -> Settings:
  """The settings of a side-by-side benchmark: quick or full, with ``--budget`` applied."""
  settings = QUICK if args.quick else FULL
  return settings if args.budget is None else settings._replace(budget_s=args.budget)


def side_table(results: list, detail, reference: str, columns: list) -> str:
  """Markdown for a side-by-side benchmark: per model a caption and one row per case.

  Each row has the case, its time per step and its ratio to ``reference`` with the 95% CI, then
  one cell per ``(header, cell)`` in ``columns``, ``cell(name, case, model)``; ``detail(model)``
  completes the caption.
  """
  out = []
  for m in results:
    out.append(
      f'**{m["name"]}** ({m["description"]}, {detail(m)}; '
      f'{m["rounds"]} rounds of {m["steps"]} steps)\n'
    )
    heads = ['case', 'time / step (ms)', f'vs {reference} (95% CI)'] + [h for h, _ in columns]
    out.append('| ' + ' | '.join(heads) + ' |')
    out.append('|' + '---|' * len(heads))
    for name, c in m['cases'].items():
      lo, hi = c['ci95']
      cells = [name, f'{c["time_ms"]:.3f}', f'{c[f"ratio_vs_{reference}"]:.3f} ({lo:.3f}-{hi:.3f})']
      cells += [cell(name, c, m) for _, cell in columns]
      out.append('| ' + ' | '.join(cells) + ' |')
    out.append('')
  return '\n'.join(out)


def save(out: str, stem: str, argv: Sequence[str], models: list, text: str) -> None:
  """Writes a side-by-side benchmark's results and prints their markdown.

  ``OUT/STEM.json`` holds the environment and ``models``; ``OUT/STEM.md`` holds ``text``.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  env = environment(argv or [], '', f'benchmarks.{stem}')
  (out / f'{stem}.json').write_text(json.dumps(dict(environment=env, models=models), indent=1))
  (out / f'{stem}.md').write_text(text)
  print(text)


def load_average() -> Optional[list]:
  """The 1, 5 and 15 minute load averages, or ``None`` where the system has none."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def environment(
  argv: Sequence[str], device_note: str, module: str = 'benchmarks.run'
) -> dict[str, Any]:
  """Device, versions, date, the command line and the commit (``-dirty``: uncommitted changes)."""
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    if names:
      cpu = names[0]
  except OSError:
    pass
  versions = {'python': platform.python_version()}
  for package in ('jax', 'jaxlib', 'optax', 'flax', 'numpy', 'optax_sam'):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  try:
    git = lambda *a: subprocess.run(['git', *a], capture_output=True, text=True, check=False)
    commit = git('rev-parse', '--short', 'HEAD').stdout.strip()
    if commit and git('status', '--porcelain', '--untracked-files=no').stdout.strip():
      commit += '-dirty'
  except OSError:
    commit = ''
  return {
    'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    'command': shlex.join(['python', '-m', module, *argv]),
    'platform': device.platform,
    'device': device.device_kind,
    'device_count': jax.device_count(),
    'cpu': cpu,
    'cpu_count': os.cpu_count(),
    'device_note': device_note,
    'load_average_at_start': load_average(),
    'versions': versions,
    'git_commit': commit or None,
    'base_optimizer': cases_lib.BASE_OPTIMIZER_NAME,
    'dtype': 'float32',
  }
