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

# The compiling, the timing loop and the environment recorded with the results are
# benchmarks.harness's; this script chooses the models and cases, checks the targets and
# writes the tables.

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np

from benchmarks import cases as cases_lib
from benchmarks import harness, models

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


def measure_model(
  model: models.Model,
  settings: harness.Settings,
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
    runner = harness.Runner(case, params, model_state, batch, settings.compiler_options)
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

  times = harness.interleaved(runners, rounds, steps)

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
        r[f'ratio_vs_{ref}'] = harness.ratio(by_name, r['name'], ref)
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


# ----------------------------------------------------------------------------- targets


def _time_target(target, case, by_name, ref, threshold, diagnostic=False):
  r = harness.ratio(by_name, case, ref)
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
  targets = _time_targets(by_name) + _contrib_memory_targets(by_name)
  if 'minimal' not in by_name:
    return targets
  return targets + _state_memory_targets(model_result, by_name)


def _time_targets(by_name: dict) -> list:
  """Each variant's one-call time against the minimal step, contrib opaque and the same math,
  and its two-phase time against its one-call time."""
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
  return targets


def _contrib_memory_targets(by_name: dict) -> list:
  """Two-phase footprints against optax.contrib.sam transparent's, for the same state."""
  targets = []
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
  return targets


def _state_memory_targets(model_result: dict, by_name: dict) -> list:
  """Each optax_sam case's argument bytes and footprint against the minimal step's plus its
  documented state (and, as a diagnostic, its footprint against the same math's)."""
  p_bytes = model_result['param_bytes']
  minimal = by_name['minimal']['memory']
  targets = []
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


def _new_report(argv: Sequence[str], args: argparse.Namespace, settings) -> dict[str, Any]:
  """The report before any model is measured: the environment, the settings and the targets."""
  return {
    'environment': harness.environment(argv, args.device_note),
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


def _log_targets(targets: list, log) -> None:
  for t in targets:
    noise = ' (within noise)' if t['within_noise'] else ''
    value = f'{t["value"]:.3f}' if isinstance(t['value'], float) else f'{t["value"]:,}'
    tag = ' [diagnostic]' if t['diagnostic'] else ''
    log(f'  {t["verdict"]}{noise}{tag}: {t["target"]}: {t["case"]} = {value} ({t["threshold"]})')


def _summary(report: dict, start: float) -> dict[str, Any]:
  """PASS and MISS counts over every model's targets (diagnostics left out), and the wall time."""
  measured = report['models'] + report['sweep']
  all_targets = [t for m in measured for t in m['targets'] if not t['diagnostic']]
  misses = [t for t in all_targets if t['verdict'] == 'MISS']
  return {
    'pass': len(all_targets) - len(misses),
    'miss': len(misses),
    'miss_within_noise': sum(t['within_noise'] for t in misses),
    'misses': [
      f'{m["name"]}: {t["target"]}: {t["case"]}'
      for m in measured
      for t in m['targets']
      if t['verdict'] == 'MISS' and not t['diagnostic']
    ],
    'wall_s': time.perf_counter() - start,
    'load_average_at_end': harness.load_average(),
  }


def _write(report: dict, out: str) -> None:
  """``OUT/benchmarks.json`` (the whole report) and ``OUT/benchmarks.md`` (its tables)."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'benchmarks.json'), 'w') as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(out, 'benchmarks.md'), 'w') as f:
    f.write(text + '\n')


def main(argv: Optional[Sequence[str]] = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  settings = harness.QUICK if args.quick else harness.FULL
  if args.budget is not None:
    settings = settings._replace(budget_s=args.budget)
  if args.rounds is not None:
    settings = settings._replace(min_rounds=args.rounds, max_rounds=args.rounds)
  log = lambda message: print(message, flush=True)
  start = time.perf_counter()
  report = _new_report(argv, args, settings)
  resnet_batch = args.resnet_batch or harness.default_resnet_batch()
  specs = harness.model_specs(args.quick, resnet_batch)
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
      _log_targets(result['targets'], log)
  report['summary'] = _summary(report, start)
  _write(report, args.out)
  log(
    f'\n{report["summary"]["pass"]} PASS, {report["summary"]["miss"]} MISS '
    f'({report["summary"]["miss_within_noise"]} within noise); '
    f'{report["summary"]["wall_s"]:.0f} s; wrote {args.out}/benchmarks.{{json,md}}'
  )
  return report


if __name__ == '__main__':
  main()
