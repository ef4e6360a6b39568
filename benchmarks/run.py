"""Step time and compiled memory of every optax_sam variant against the two-gradient limit.

Run from the repository root::

  python -m benchmarks.run                 # full run (all models and the MLP width sweep)
  python -m benchmarks.run --quick         # tiny models, a few rounds: seconds (used in CI)
  python -m benchmarks.run --models mlp,cnn --device-note 'laptop, on battery' --out /tmp/bench

For each model, every case (see :mod:`benchmarks.cases`) is compiled once
(``jax.jit`` with donated params and states, ``memory_analysis()`` of the
compiled step gives its argument, output, alias and temporary bytes), warmed
up, and then timed in interleaved rounds: each round runs every case for the
same number of SAM steps, in an order rotated (and reversed every other round)
from round to round, so that machine noise falls on all cases alike. Times are
medians over rounds of the time per SAM step (two calls for two-phase mode and
``optax.contrib.sam``'s transparent mode); ratios are medians of per-round
ratios, with a bootstrap 95% interval. The script writes ``benchmarks.json``
and ``benchmarks.md`` into ``--out`` and prints PASS/MISS for each target.
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
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases as cases_lib
from benchmarks import models

MODEL_CHOICES = ('mlp', 'cnn', 'resnet18', 'sweep')
# The sweep's cases shown as ratio columns, in table order; base and minimal are also run.
SWEEP_RATIO_CASES = (
  'sam/1call',
  'fsam/1call',
  'gsam/1call',
  'sam/2phase',
  'contrib/opaque',
  'contrib/transparent',
)
SWEEP_CASES = {'base', 'minimal', *SWEEP_RATIO_CASES}
QUICK_SWEEP_CASES = {'base', 'minimal', 'sam/1call', 'sam/2phase'}
# Two-phase variants whose state is contrib's (a copy of the weights) plus at most a scalar.
SAME_STATE_AS_CONTRIB = ('sam', 'usam', 'asam', 'stablesam')

TIME_VS_MINIMAL = 1.02
TIME_VS_CONTRIB = 1.0
TWO_PHASE_VS_ONE_CALL = 1.05


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


# ----------------------------------------------------------------------------- measurement


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


def _bootstrap_ci(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple:
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


def measure_model(
  model: models.Model,
  settings: Settings,
  only: Optional[set],
  with_references: bool,
  log,
) -> dict[str, Any]:
  """Compiles, warms up and times every case of ``model`` in interleaved rounds."""
  params, model_state = model.init(jax.random.key(0))
  batch = model.batch(jax.random.key(1))
  p_bytes = models.param_bytes(params)
  case_list = cases_lib.build_cases(model, p_bytes, only, with_references)
  log(
    f'\n== {model.name}: {model.description}, batch {model.batch_size}, '
    f'{models.param_count(params):,} parameters ({p_bytes:,} bytes), {len(case_list)} cases'
  )

  runners = []
  for case in case_list:
    runner = Runner(case, params, model_state, batch, settings.compiler_options)
    runners.append(runner)
    log(f'  compiled {case.name:22s} in {runner.compile_s:6.2f} s')

  # Warm-up, and a first estimate of each case's time per SAM step.
  estimate = {}
  for runner in runners:
    runner.run(settings.warmup_steps)
    estimate[runner.case.name] = runner.run(1)
    if estimate[runner.case.name] < 0.1:
      estimate[runner.case.name] = min(estimate[runner.case.name], runner.run(1))
  reference = estimate.get('minimal', max(estimate.values()))
  steps = max(1, round(settings.measure_s / reference))
  round_s = steps * sum(estimate.values())
  rounds = int(
    np.clip(settings.budget_s // max(round_s, 1e-9), settings.min_rounds, settings.max_rounds)
  )
  log(f'  timing: {rounds} rounds x {steps} SAM steps per case (~{round_s:.2f} s per round)')

  times = interleaved(runners, rounds, steps)

  results = []
  for runner in runners:
    case = runner.case
    t = np.asarray(times[case.name])
    results.append(
      {
        'name': case.name,
        'kind': case.kind,
        'variant': case.variant,
        'mode': case.mode,
        'calls_per_sam_step': case.calls_per_step,
        'time_ms': float(np.median(t) * 1e3),
        'time_ms_iqr': [float(np.percentile(t, 25) * 1e3), float(np.percentile(t, 75) * 1e3)],
        'times_ms': [float(x * 1e3) for x in t],
        'compile_s': runner.compile_s,
        'memory': runner.memory,
        'expected_state_bytes': case.expected_state_bytes,
      }
    )
  by_name = {r['name']: r for r in results}
  for r in results:
    for ref in ('minimal', 'base', 'contrib/opaque'):
      if ref in by_name:
        r[f'ratio_vs_{ref}'] = ratio(by_name, r['name'], ref)
    if 'minimal' in by_name:
      r['argument_delta_vs_minimal'] = (
        r['memory']['argument'] - by_name['minimal']['memory']['argument']
      )
      r['footprint_delta_vs_minimal'] = (
        r['memory']['footprint'] - by_name['minimal']['memory']['footprint']
      )
  return {
    'name': model.name,
    'description': model.description,
    'batch_size': model.batch_size,
    'param_count': models.param_count(params),
    'param_bytes': p_bytes,
    'rounds': rounds,
    'sam_steps_per_measurement': steps,
    'cases': results,
  }


def ratio(by_name: dict, name: str, ref: str) -> dict[str, float]:
  """Median over rounds of ``time(name) / time(ref)`` (same round), with a 95% interval."""
  per_round = np.asarray(by_name[name]['times_ms']) / np.asarray(by_name[ref]['times_ms'])
  low, high = _bootstrap_ci(per_round)
  return {'median': float(np.median(per_round)), 'ci95': [low, high]}


# ----------------------------------------------------------------------------- targets


def _time_target(target, case, by_name, ref, threshold, diagnostic=False):
  r = ratio(by_name, case, ref)
  return {
    'target': target,
    'case': case,
    'value': r['median'],
    'ci95': r['ci95'],
    'threshold': f'<= {threshold:.2f}x {ref}',
    'verdict': 'PASS' if r['median'] <= threshold else 'MISS',
    'within_noise': r['ci95'][0] <= threshold <= r['ci95'][1],
    'diagnostic': diagnostic,
    'note': '',
  }


def _memory_target(target, case, value, threshold, passed, note, diagnostic=False):
  return {
    'target': target,
    'case': case,
    'value': int(value),
    'threshold': threshold,
    'verdict': 'PASS' if passed else 'MISS',
    'within_noise': False,
    'diagnostic': diagnostic,
    'note': note,
  }


def check_targets(model_result: dict) -> list:
  """The issue's targets for the cases this model has, and diagnostics against hand-written math.

  Targets (from the issue): one-call time <= 1.02x the minimal SAM step and <=
  optax.contrib.sam opaque's; two-phase time per SAM step <= 1.05x one-call;
  two-phase footprint below optax.contrib.sam transparent's (for the variants
  whose state is contrib's: a weight copy and at most a scalar); argument bytes
  equal to the minimal step's plus exactly the documented state; footprint at
  most the minimal step's plus the documented state. Diagnostics (not counted
  in the summary): the same comparisons against the hand-written step with the
  variant's own math (``ref/<variant>``), which separate the cost of the math
  from the library's.
  """
  by_name = {c['name']: c for c in model_result['cases']}
  p_bytes = model_result['param_bytes']
  targets = []
  for v in cases_lib.VARIANTS:
    one, two, ref = f'{v.name}/1call', f'{v.name}/2phase', f'ref/{v.name}'
    if v.name == 'sam':
      ref = 'minimal'
    if one in by_name and 'minimal' in by_name:
      targets.append(
        _time_target('time: one-call vs minimal', one, by_name, 'minimal', TIME_VS_MINIMAL)
      )
    if one in by_name and 'contrib/opaque' in by_name:
      targets.append(
        _time_target(
          'time: one-call vs contrib opaque', one, by_name, 'contrib/opaque', TIME_VS_CONTRIB
        )
      )
    if one in by_name and two in by_name:
      targets.append(
        _time_target('time: two-phase vs one-call', two, by_name, one, TWO_PHASE_VS_ONE_CALL)
      )
    if one in by_name and ref in by_name and ref != 'minimal':
      targets.append(
        _time_target(
          'time: one-call vs hand-written same math', one, by_name, ref, TIME_VS_MINIMAL, True
        )
      )
  for v in cases_lib.VARIANTS:
    two = f'{v.name}/2phase'
    if v.name in SAME_STATE_AS_CONTRIB and two in by_name and 'contrib/transparent' in by_name:
      mine = by_name[two]['memory']['footprint']
      theirs = by_name['contrib/transparent']['memory']['footprint']
      targets.append(
        _memory_target(
          'memory: two-phase footprint < contrib transparent',
          two,
          mine - theirs,
          '< 0 bytes difference',
          mine < theirs,
          f'{mine:,} vs {theirs:,} bytes',
        )
      )
  if 'minimal' not in by_name:
    return targets
  minimal = by_name['minimal']['memory']
  for c in model_result['cases']:
    expected = c['expected_state_bytes']
    if c['kind'] != 'optax_sam' or expected is None:
      continue
    delta = c['argument_delta_vs_minimal']
    targets.append(
      _memory_target(
        'memory: argument bytes = minimal + documented state',
        c['name'],
        delta,
        f'== {expected:,} bytes',
        delta == expected,
        _describe_state(expected, p_bytes),
      )
    )
    footprint = c['footprint_delta_vs_minimal']
    temp = c['memory']['temp'] - minimal['temp']
    targets.append(
      _memory_target(
        'memory: footprint <= minimal + documented state',
        c['name'],
        footprint,
        f'<= {expected:,} bytes',
        footprint <= expected,
        f'temp {temp:+,} bytes ({temp / p_bytes:+.2f} P) vs minimal',
      )
    )
    ref = 'minimal' if c['variant'] == 'sam' else f'ref/{c["variant"]}'
    if c['mode'] == '1call' and ref in by_name and ref != 'minimal':
      mine, theirs = c['memory']['footprint'], by_name[ref]['memory']['footprint']
      targets.append(
        _memory_target(
          'memory: footprint <= hand-written same math',
          c['name'],
          mine - theirs,
          '<= 0 bytes difference',
          mine <= theirs,
          f'{mine:,} vs {theirs:,} bytes',
          diagnostic=True,
        )
      )
  return targets


def _describe_state(expected: int, p_bytes: int) -> str:
  if expected == 0:
    return 'no state'
  parts = []
  rest = expected
  while rest >= p_bytes:
    parts.append('P')
    rest -= p_bytes
  if rest:
    parts.append(str(rest))
  return ' + '.join(parts) + f' (P = {p_bytes:,} parameter bytes)'


# ----------------------------------------------------------------------------- reporting


def _load_average() -> Optional[list]:
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
    'load_average_at_start': _load_average(),
    'versions': versions,
    'git_commit': commit or None,
    'base_optimizer': cases_lib.BASE_OPTIMIZER_NAME,
    'dtype': 'float32',
  }


def _mib(n: int) -> str:
  return f'{n / 2**20:.2f}'


def _ratio_cell(r: Optional[dict]) -> str:
  if r is None:
    return ''
  return f'{r["median"]:.3f} [{r["ci95"][0]:.3f}, {r["ci95"][1]:.3f}]'


def model_table(m: dict) -> list:
  lines = [
    f'### {m["name"]}: {m["description"]}',
    '',
    f'{m["param_count"]:,} parameters (P = {m["param_bytes"]:,} bytes), batch {m["batch_size"]}, '
    f'{m["rounds"]} interleaved rounds of {m["sam_steps_per_measurement"]} SAM steps per case.',
    '',
    '| case | calls / SAM step | ms / SAM step | x minimal [95% CI] | x base | argument MiB '
    '| temp MiB | footprint MiB | argument - minimal (bytes) | documented state (bytes) |',
    '|---|---:|---:|---|---:|---:|---:|---:|---:|---:|',
  ]
  for c in m['cases']:
    mem = c['memory']
    expected = c['expected_state_bytes']
    base = c.get('ratio_vs_base')
    lines.append(
      f'| {c["name"]} | {c["calls_per_sam_step"]} | {c["time_ms"]:.2f} | '
      f'{_ratio_cell(c.get("ratio_vs_minimal"))} | {base["median"]:.3f} | '
      f'{_mib(mem["argument"])} | {_mib(mem["temp"])} | {_mib(mem["footprint"])} | '
      f'{c.get("argument_delta_vs_minimal", 0):,} | '
      f'{"" if expected is None else f"{expected:,}"} |'
    )
  return lines


_COLUMNS = (  # (target, mode of the case, column header)
  ('time: one-call vs minimal', '1call', '1-call time / minimal (<= 1.02)'),
  ('time: one-call vs contrib opaque', '1call', '1-call time / contrib opaque (<= 1.00)'),
  ('time: two-phase vs one-call', '2phase', '2-phase time / 1-call (<= 1.05)'),
  ('memory: argument bytes = minimal + documented state', '1call', '1-call argument - minimal'),
  ('memory: argument bytes = minimal + documented state', '2phase', '2-phase argument - minimal'),
  ('memory: footprint <= minimal + documented state', '1call', '1-call footprint - minimal'),
  ('memory: footprint <= minimal + documented state', '2phase', '2-phase footprint - minimal'),
  ('memory: two-phase footprint < contrib transparent', '2phase', '2-phase footprint - contrib'),
  ('time: one-call vs hand-written same math', '1call', 'diag.: 1-call time / same math'),
  ('memory: footprint <= hand-written same math', '1call', 'diag.: 1-call footprint - same math'),
)


def _cell(t: dict) -> str:
  if isinstance(t['value'], float):
    value = f'{t["value"]:.3f}'
  else:
    value = f'{t["value"]:+,}' if t['value'] else '0'
  verdict = 'PASS' if t['verdict'] == 'PASS' else '**MISS**'
  return f'{value} {verdict}' + ('~' if t['within_noise'] else '')


def targets_table(targets: list) -> list:
  """One row per variant, one column per target (bytes for memory, ratios for time)."""
  cells, columns = {}, []
  for t in targets:
    variant, mode = t['case'].split('/')
    cells[(variant, t['target'], mode)] = _cell(t)
  for target, mode, header in _COLUMNS:
    if any(k[1:] == (target, mode) for k in cells):
      columns.append((target, mode, header))
  variants = [v.name for v in cases_lib.VARIANTS if any(k[0] == v.name for k in cells)]
  lines = [
    '| variant | ' + ' | '.join(h for _, _, h in columns) + ' |',
    '|---|' + '---:|' * len(columns),
  ]
  for v in variants:
    row = [cells.get((v, target, mode), '') for target, mode, _ in columns]
    lines.append(f'| {v} | ' + ' | '.join(row) + ' |')
  return lines


def sweep_table(sweep: list) -> list:
  names = [n for n in SWEEP_RATIO_CASES if any(n in {c['name'] for c in m['cases']} for m in sweep)]
  header = (
    '| model | parameters | base ms | minimal ms | minimal / base | '
    + ' | '.join(f'{n} x minimal' for n in names)
    + ' |'
  )
  lines = [header, '|---|---:|---:|---:|---:|' + '---:|' * len(names)]
  for m in sweep:
    by_name = {c['name']: c for c in m['cases']}
    cells = [
      f'{by_name[n]["ratio_vs_minimal"]["median"]:.3f}' if n in by_name else '' for n in names
    ]
    lines.append(
      f'| {m["name"]} | {m["param_count"]:,} | {by_name["base"]["time_ms"]:.2f} | '
      f'{by_name["minimal"]["time_ms"]:.2f} | '
      f'{by_name["minimal"]["ratio_vs_base"]["median"]:.3f} | ' + ' | '.join(cells) + ' |'
    )
  return lines


def markdown(report: dict) -> str:
  env = report['environment']
  v = env['versions']
  lines = [
    '## Results',
    '',
    f'- Date: {env["date"]}',
    f'- Command: `{env["command"]}`',
    f'- Device: {env["platform"]} / {env["device"]} ({env["cpu"]}, {env["cpu_count"]} cores '
    'visible)' + (f'; note: {env["device_note"]}' if env['device_note'] else ''),
    f'- Versions: python {v["python"]}, jax {v["jax"]}, jaxlib {v["jaxlib"]}, optax {v["optax"]}, '
    f'flax {v["flax"]}, numpy {v["numpy"]}, optax_sam {v["optax_sam"]} (commit '
    f'{env["git_commit"]})',
    f'- Base optimizer: `{env["base_optimizer"]}`, {env["dtype"]}; quick mode: {report["quick"]}',
    f'- Load average (1, 5, 15 min) at start: {env["load_average_at_start"]}, at end: '
    f'{report["summary"]["load_average_at_end"]}; wall time {report["summary"]["wall_s"]:.0f} s',
    '',
    f'Targets: {report["summary"]["pass"]} PASS, {report["summary"]["miss"]} MISS '
    f'({report["summary"]["miss_within_noise"]} of the misses within the timing noise).',
    '',
  ]
  for m in report['models']:
    lines += model_table(m) + ['', 'Targets (`~`: the 95% interval contains the threshold):', '']
    lines += targets_table(m['targets']) + ['']
  if report['sweep']:
    lines += [
      '### Parameter-count sweep (MLP, two hidden layers of the given width)',
      '',
      'Time ratios to the minimal SAM step (medians of per-round ratios).',
      '',
    ]
    lines += sweep_table(report['sweep']) + ['']
    for m in report['sweep']:
      misses = [t for t in m['targets'] if t['verdict'] == 'MISS' and not t['diagnostic']]
      if misses:
        lines += [f'Misses for {m["name"]}:', ''] + targets_table(misses) + ['']
  return '\n'.join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog='python -m benchmarks.run',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--quick', action='store_true', help='tiny models, few rounds (seconds)')
  parser.add_argument(
    '--models',
    default=None,
    help=f'comma-separated subset of {",".join(MODEL_CHOICES)} (default: all; with --quick: '
    'mlp,cnn,sweep)',
  )
  parser.add_argument('--device-note', default='', help='free text recorded with the results')
  parser.add_argument(
    '--out', default='benchmarks/results', help='directory for benchmarks.json and benchmarks.md'
  )
  parser.add_argument(
    '--resnet-batch',
    type=int,
    default=None,
    help='ResNet-18 batch size (default: 128 on an accelerator, 8 on CPU)',
  )
  parser.add_argument(
    '--budget',
    type=float,
    default=None,
    help='seconds of timed rounds per model (default: 90, quick: 0.5)',
  )
  parser.add_argument('--rounds', type=int, default=None, help='fix the number of rounds')
  parser.add_argument(
    '--no-references',
    dest='references',
    action='store_false',
    help='skip the hand-written per-variant steps (ref/*; measured for mlp and cnn only)',
  )
  args = parser.parse_args(argv)
  if args.models is None:
    args.models = 'mlp,cnn,sweep' if args.quick else ','.join(MODEL_CHOICES)
  chosen = [m.strip() for m in args.models.split(',') if m.strip()]
  unknown = sorted(set(chosen) - set(MODEL_CHOICES))
  if unknown:
    parser.error(f'unknown models {unknown}; choose from {",".join(MODEL_CHOICES)}')
  args.models = chosen
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  settings = QUICK if args.quick else FULL
  if args.budget is not None:
    settings = settings._replace(budget_s=args.budget)
  if args.rounds is not None:
    settings = settings._replace(min_rounds=args.rounds, max_rounds=args.rounds)
  log = lambda message: print(message, flush=True)
  start = time.perf_counter()
  report = {
    'environment': environment(argv, args.device_note),
    'quick': args.quick,
    'settings': settings._asdict(),
    'targets_definition': {
      'time_vs_minimal': TIME_VS_MINIMAL,
      'time_vs_contrib_opaque': TIME_VS_CONTRIB,
      'two_phase_vs_one_call': TWO_PHASE_VS_ONE_CALL,
    },
    'models': [],
    'sweep': [],
  }
  resnet_batch = args.resnet_batch or default_resnet_batch()
  specs = model_specs(args.quick, resnet_batch)
  for choice in args.models:
    for model in specs[choice]:
      sweep = choice == 'sweep'
      scale = {'sweep': 1 / 3, 'resnet18': 2}.get(choice, 1)
      model_settings = settings._replace(budget_s=settings.budget_s * scale)
      with_references = args.references and choice in ('mlp', 'cnn')
      only = (QUICK_SWEEP_CASES if args.quick else SWEEP_CASES) if sweep else None
      result = measure_model(model, model_settings, only, with_references, log)
      result['targets'] = check_targets(result)
      report['sweep' if choice == 'sweep' else 'models'].append(result)
      for t in result['targets']:
        noise = ' (within noise)' if t['within_noise'] else ''
        value = f'{t["value"]:.3f}' if isinstance(t['value'], float) else f'{t["value"]:,}'
        tag = ' [diagnostic]' if t['diagnostic'] else ''
        log(
          f'  {t["verdict"]}{noise}{tag}: {t["target"]}: {t["case"]} = {value} ({t["threshold"]})'
        )
  all_targets = [
    t for m in report['models'] + report['sweep'] for t in m['targets'] if not t['diagnostic']
  ]
  misses = [t for t in all_targets if t['verdict'] == 'MISS']
  report['summary'] = {
    'pass': len(all_targets) - len(misses),
    'miss': len(misses),
    'miss_within_noise': sum(t['within_noise'] for t in misses),
    'misses': [
      f'{m["name"]}: {t["target"]}: {t["case"]}'
      for m in report['models'] + report['sweep']
      for t in m['targets']
      if t['verdict'] == 'MISS' and not t['diagnostic']
    ],
    'wall_s': time.perf_counter() - start,
    'load_average_at_end': _load_average(),
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'benchmarks.json'), 'w') as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(args.out, 'benchmarks.md'), 'w') as f:
    f.write(text + '\n')
  log(
    f'\n{report["summary"]["pass"]} PASS, {report["summary"]["miss"]} MISS '
    f'({report["summary"]["miss_within_noise"]} within noise); '
    f'{report["summary"]["wall_s"]:.0f} s; wrote {args.out}/benchmarks.{{json,md}}'
  )
  return report


if __name__ == '__main__':
  main()
