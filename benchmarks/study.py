"""Do F-SAM's and StableSAM's claims hold at small scale? MNIST-1D, the example's ResNet.

Run from the repository root::

  python -m benchmarks.study                        # the full study (docs/study.md)
  python -m benchmarks.study --smoke --out /tmp/s   # a tiny end-to-end check of the script

Three parts, each trained with the example (``optax_sam.examples``: the
residual CNN, SGD with momentum 0.9, weight decay 5e-4 on kernels, a cosine
learning rate) in a reduced setting that fits CPU minutes (first-stage width
16, 8 epochs, peak learning rate 0.2, MNIST-1D's 4000 training and 1000 test
examples):

1. **main**: SGD, SAM, F-SAM, StableSAM (USAM plus renormalization, as its
   paper ran it), ASAM and GSAM with their default radii, at 0%, 20% and 40%
   label noise, 5 seeds each. Test accuracy (mean and standard deviation over
   seeds), the final top Hessian eigenvalue (``train.measure_sharpness`` on the
   first 512 training examples, eval mode) and, per seed, the difference of
   each optimizer to SAM and to SGD.
2. **rho**: SAM against F-SAM for ``rho`` in {0.02, 0.05, 0.1, 0.2, 0.5}, 5
   seeds, no label noise (F-SAM's claim: robust to the radius).
3. **lr**: SAM, USAM and StableSAM for peak learning rates from 0.05 up to
   where training stops, 3 seeds, no label noise (StableSAM's claim: larger
   stable learning rates). A run *diverged* when its last epoch's mean train
   loss is NaN or above ln(10), the loss of a uniform guess; it *did not
   train* when it diverged or its last epoch's train accuracy is below 50%.

A seed fixes the initialization, the batch order, dropout and the noisy
labels (the example's ``Config.seed``), so the runs of one seed differ only by
the optimizer; a run that two parts share (SAM at ``rho = 0.05``, lr 0.2, no
noise) is trained once. A paired difference whose mean is not larger than the
standard deviation of the per-seed differences is reported as "no difference".

Writes ``study.json`` (the setting and every run), ``study.md`` (the tables)
and ``study.png`` (accuracy against rho, final train loss against lr, accuracy
against label noise) to ``--out``; ``study.partial.json`` holds the runs done
so far while it runs, and ``--resume`` continues from it.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import time
from typing import Optional

import jax

from benchmarks import paired
from optax_sam.examples import config as config_lib
from optax_sam.examples import train

OPTIMIZERS = ('sgd', 'sam', 'fsam', 'stablesam', 'asam', 'gsam')
NOISES = (0.0, 0.2, 0.4)
RHO_OPTIMIZERS = ('sam', 'fsam')
RHOS = (0.02, 0.05, 0.1, 0.2, 0.5)
LR_OPTIMIZERS = ('sam', 'usam', 'stablesam')
LRS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
# A run that trained: its last epoch's train accuracy (on the noisy labels, if any) reaches this.
TRAINED_ACCURACY = 0.5
NAMES = {
  'sgd': 'SGD',
  'sam': 'SAM',
  'usam': 'USAM',
  'fsam': 'F-SAM',
  'stablesam': 'StableSAM',
  'asam': 'ASAM',
  'gsam': 'GSAM',
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """What one invocation of the study trains."""

  base: config_lib.Config
  seeds: tuple[int, ...]
  noises: tuple[float, ...] = NOISES
  optimizers: tuple[str, ...] = OPTIMIZERS
  rhos: tuple[float, ...] = RHOS
  rho_noise: float = 0.0
  rho_optimizers: tuple[str, ...] = RHO_OPTIMIZERS
  lrs: tuple[float, ...] = LRS
  lr_optimizers: tuple[str, ...] = LR_OPTIMIZERS
  lr_seeds: tuple[int, ...] = (0, 1, 2)
  lr_noise: float = 0.0
  sharpness_parts: tuple[str, ...] = ('main',)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {'base': self.base.to_dict()}

  @classmethod
  def from_dict(cls, fields: dict) -> 'Setting':
    """The inverse of :meth:`to_dict` (a ``study.json``'s ``setting``)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls(**values | {'base': config_lib.Config(**fields['base'])})


def full_setting(
  seeds: int = 5, lr_seeds: int = 3, epochs: int = 8, width: int = 16, lr: float = 0.2
) -> Setting:
  """The documented study (docs/study.md)."""
  base = config_lib.Config(width=width, epochs=epochs, lr=lr)
  return Setting(base=base, seeds=tuple(range(seeds)), lr_seeds=tuple(range(lr_seeds)))


def smoke_setting() -> Setting:
  """2 seeds, 1 epoch, a width-4 ResNet on 300 examples, 3 optimizers, 2-point sweeps.

  Each optimizer setting compiles its train step once (some seconds on CPU): the smoke run
  keeps them few (SAM and StableSAM in the learning-rate sweep, each sweep's first point the
  main part's).
  """
  base = config_lib.Config(width=4, epochs=1, num_samples=300, batch_size=60, lr=0.2)
  return Setting(
    base=base,
    seeds=(0, 1),
    noises=(0.0, 0.4),
    optimizers=('sgd', 'sam', 'fsam'),
    rhos=(0.05, 0.5),
    lrs=(0.2, 5.0),
    lr_seeds=(0, 1),
    lr_optimizers=('sam', 'stablesam'),
  )


def _config(setting: Setting, optimizer: str, seed: int, noise: float, **fields):
  config = dataclasses.replace(
    setting.base, optimizer=optimizer, seed=seed, label_noise=noise, **fields
  ).validate()
  # An explicit radius, so that a run two parts share is one config (and trained once).
  return dataclasses.replace(config, rho=config.resolved_rho)


def plan(setting: Setting) -> dict[config_lib.Config, list[str]]:
  """Every run to train, each with the parts it belongs to, in training order.

  Runs that share an optimizer setting are adjacent, so each setting's train step compiles once.
  """
  parts: dict[config_lib.Config, list[str]] = {}

  def add(part, config):
    parts.setdefault(config, [])
    if part not in parts[config]:
      parts[config].append(part)

  for opt in setting.optimizers:
    for noise in setting.noises:
      for seed in setting.seeds:
        add('main', _config(setting, opt, seed, noise))
  for opt in setting.rho_optimizers:
    for rho in setting.rhos:
      for seed in setting.seeds:
        add('rho', _config(setting, opt, seed, setting.rho_noise, rho=rho))
  for opt in setting.lr_optimizers:
    for lr in setting.lrs:
      for seed in setting.lr_seeds:
        add('lr', _config(setting, opt, seed, setting.lr_noise, lr=lr))
  key = lambda c: (c.optimizer, c.rho, c.lr)
  order = list(dict.fromkeys(key(c) for c in parts))  # first appearance of each setting
  return dict(sorted(parts.items(), key=lambda item: order.index(key(item[0]))))


def _record(config: config_lib.Config, parts: list[str]) -> dict:
  return dict(
    optimizer=config.optimizer,
    seed=config.seed,
    label_noise=config.label_noise,
    rho=config.rho,
    lr=config.lr,
    parts=parts,
  )


def _same_run(record: dict, config: config_lib.Config) -> bool:
  wanted = _record(config, [])
  return all(record[k] == wanted[k] for k in ('optimizer', 'seed', 'label_noise', 'rho', 'lr'))


def run_study(
  setting: Setting, *, done: Optional[list] = None, save=None, log=print
) -> tuple[list, float]:
  """Trains every planned run (skipping those in ``done``); returns the records and seconds."""
  runs = plan(setting)
  records = list(done or [])
  datasets = {}
  began = time.perf_counter()
  todo = [(c, p) for c, p in runs.items() if not any(_same_run(r, c) for r in records)]
  for i, (config, parts) in enumerate(todo, 1):
    key = (config.label_noise, config.seed)
    if key not in datasets:
      datasets[key] = train.load_dataset(config)
    measure = any(p in setting.sharpness_parts for p in parts)
    run_began = time.perf_counter()
    result = paired.run_one(config, datasets[key], sharpness=measure)
    result['seconds'] = time.perf_counter() - run_began
    records.append(_record(config, parts) | result)
    elapsed = time.perf_counter() - began
    eta = elapsed / i * (len(todo) - i)
    eig = result.get('hessian_top_eigenvalue')
    log(
      f'run {i}/{len(todo)}  {config.optimizer:<9} noise {config.label_noise:.1f} '
      f'rho {config.rho:<5g} lr {config.lr:<5g} seed {config.seed}  '
      f'test acc {result["test_accuracy"]:.4f}  train loss {result["train_loss"]:.4f}'
      + (f'  top eig {eig:.2f}' if eig is not None else '')
      + ('  DIVERGED' if result['diverged'] else '')
      + f'  elapsed {elapsed / 60:.1f} min  eta {eta / 60:.1f} min'
    )
    if save is not None:
      save(records)
  return records, time.perf_counter() - began


# ----------------------------------------------------------------------------- summaries


def _select(runs: list, part: str, **fields) -> dict[int, dict]:
  """The runs of ``part`` whose fields match, by seed."""
  return {
    r['seed']: r
    for r in runs
    if part in r['parts'] and all(math.isclose(r[k], v) if isinstance(v, float) else r[k] == v
                                  for k, v in fields.items())
  }  # fmt: skip


def _metric(by_seed: dict, seeds, name: str) -> list:
  return [by_seed[s].get(name) if s in by_seed else None for s in seeds]


def summarize(runs: list, setting: Setting) -> dict:
  """The three parts' tables: means and spreads over seeds, and paired differences."""
  table = {'main': {}, 'rho': {}, 'lr': {}}
  seeds = setting.seeds
  for noise in setting.noises:
    by = {o: _select(runs, 'main', optimizer=o, label_noise=noise) for o in setting.optimizers}
    acc = {o: _metric(by[o], seeds, 'test_accuracy') for o in by}
    rows = {}
    for o in setting.optimizers:
      row = dict(
        test_accuracy=paired.mean_std(acc[o]),
        hessian_top_eigenvalue=paired.mean_std(_metric(by[o], seeds, 'hessian_top_eigenvalue')),
        train_loss=paired.mean_std(_metric(by[o], seeds, 'train_loss')),
        rho=next(iter(by[o].values()))['rho'] if by[o] else None,
      )
      for ref in ('sam', 'sgd'):
        if ref in acc and ref != o:
          row[f'vs_{ref}'] = paired.paired_difference(acc[o], acc[ref])
      rows[o] = row
    table['main'][f'{noise:.1f}'] = rows

  rho_opts = setting.rho_optimizers
  for o in rho_opts:
    table['rho'][o] = {}
    for rho in setting.rhos:
      by = _select(runs, 'rho', optimizer=o, rho=rho)
      table['rho'][o][f'{rho:g}'] = dict(
        test_accuracy=paired.mean_std(_metric(by, seeds, 'test_accuracy')),
        hessian_top_eigenvalue=paired.mean_std(_metric(by, seeds, 'hessian_top_eigenvalue')),
      )
    means = [r['test_accuracy']['mean'] for r in table['rho'][o].values()]
    means = [m for m in means if m is not None]
    table['rho'][f'{o}_range'] = max(means) - min(means) if means else None
  if set(RHO_OPTIMIZERS) <= set(rho_opts):
    table['rho']['fsam_vs_sam'] = {
      f'{rho:g}': paired.paired_difference(
        _metric(_select(runs, 'rho', optimizer='fsam', rho=rho), seeds, 'test_accuracy'),
        _metric(_select(runs, 'rho', optimizer='sam', rho=rho), seeds, 'test_accuracy'),
      )
      for rho in setting.rhos
    }

  for o in setting.lr_optimizers:
    rows = {}
    for lr in setting.lrs:
      by = _select(runs, 'lr', optimizer=o, lr=lr)
      rows[f'{lr:g}'] = dict(
        train_loss=paired.mean_std(_metric(by, setting.lr_seeds, 'train_loss')),
        train_accuracy=paired.mean_std(_metric(by, setting.lr_seeds, 'train_accuracy')),
        test_accuracy=paired.mean_std(_metric(by, setting.lr_seeds, 'test_accuracy')),
        diverged=sum(bool(r['diverged']) for r in by.values()),
        failed=sum(not trained(r) for r in by.values()),
        runs=len(by),
      )
    table['lr'][o] = rows
  lr_opts = setting.lr_optimizers
  table['lr']['stable'] = {o: stability(table['lr'][o]) for o in lr_opts}
  table['lr']['trains'] = {o: stability(table['lr'][o], 'failed') for o in lr_opts}
  return table


def trained(run: dict) -> bool:
  """Whether a run trained: it did not diverge and reached :data:`TRAINED_ACCURACY`."""
  accuracy = run['train_accuracy']
  return not run['diverged'] and math.isfinite(accuracy) and accuracy >= TRAINED_ACCURACY


def stability(rows: dict, key: str = 'diverged') -> dict:
  """The largest learning rate below which no seed diverged, and the first at which one did.

  Args:
    rows: ``{lr: {key: count, 'runs': count, ...}}`` (lr as text), any order.
    key: the count of bad runs: ``'diverged'``, or ``'failed'`` (diverged or did not train).

  Returns:
    ``largest_stable``: the largest lr such that no run at it or at any smaller lr diverged
    (``None`` if the smallest already did); ``first_diverged``: the smallest lr at which some
    run diverged (``None`` if none did).

  Example:
    >>> from benchmarks import study
    >>> rows = {'0.1': dict(diverged=0, runs=3), '1': dict(diverged=1, runs=3),
    ...         '0.5': dict(diverged=0, runs=3)}
    >>> study.stability(rows)
    {'largest_stable': 0.5, 'first_diverged': 1.0}
  """
  largest, first = None, None
  for lr, row in sorted(rows.items(), key=lambda item: float(item[0])):
    if row['runs'] and row[key]:
      first = float(lr)
      break
    if row['runs']:
      largest = float(lr)
  return dict(largest_stable=largest, first_diverged=first)


# ----------------------------------------------------------------------------- report


def _pm(stat: dict, scale: float = 1.0, spec: str = '.2f') -> str:
  if stat is None or stat['mean'] is None:
    return '–'
  return f'{format(scale * stat["mean"], spec)} ± {format(scale * stat["std"], spec)}'


def _diff(d: Optional[dict]) -> str:
  if d is None:
    return ''
  if d['mean'] is None:
    return '–'
  std = '–' if d['std'] is None else f'{100 * d["std"]:.2f}'
  return f'{100 * d["mean"]:+.2f} ± {std} ({d["verdict"]}, {d["wins"]}/{d["n"]})'


def markdown(table: dict, setting: Setting) -> str:
  """The study's tables (accuracies in %)."""
  n, lines = len(setting.seeds), []
  lines.append(
    f'## Main: test accuracy and top Hessian eigenvalue ({n} seeds, mean ± std)\n\n'
    'Paired columns: the mean ± std over seeds of the per-seed difference in test accuracy '
    '(points of %), the verdict ("no difference" when the mean is not larger than the std) '
    'and the seeds on which the optimizer was ahead.\n'
  )
  for noise, rows in table['main'].items():
    lines.append(f'**Label noise {float(noise):.0%}**\n')
    lines.append(
      '| optimizer | rho | test acc (%) | top Hessian eigenvalue | final train loss '
      '| − SAM (paired) | − SGD (paired) |'
    )
    lines.append('|---|---|---|---|---|---|---|')
    for o, r in rows.items():
      lines.append(
        f'| {NAMES[o]} | {r["rho"]:g} | {_pm(r["test_accuracy"], 100)} '
        f'| {_pm(r["hessian_top_eigenvalue"], 1, ".1f")} | {_pm(r["train_loss"], 1, ".3f")} '
        f'| {_diff(r.get("vs_sam"))} | {_diff(r.get("vs_sgd"))} |'
      )
    lines.append('')
  if table['rho']:
    lines.append(
      f'## Radius sweep: SAM against F-SAM ({n} seeds, label noise '
      f'{setting.rho_noise:.0%}, test accuracy %)\n'
    )
    has_pair = 'fsam_vs_sam' in table['rho']
    opts = list(setting.rho_optimizers)
    header = '| rho | ' + ' | '.join(f'{NAMES[o]}' for o in opts)
    lines.append(header + (' | F-SAM − SAM (paired) |' if has_pair else ' |'))
    lines.append('|---' * (1 + len(opts) + has_pair) + '|')
    for rho in (f'{r:g}' for r in setting.rhos):
      cells = [_pm(table['rho'][o][rho]['test_accuracy'], 100) for o in opts]
      if has_pair:
        cells.append(_diff(table['rho']['fsam_vs_sam'][rho]))
      lines.append(f'| {rho} | ' + ' | '.join(cells) + ' |')
    spans = ', '.join(
      f'{NAMES[o]} {100 * table["rho"][f"{o}_range"]:.2f}'
      for o in opts
      if table['rho'][f'{o}_range'] is not None
    )
    lines.append(f'\nSpread of the mean accuracy over the radii (max − min, points): {spans}.\n')
  lines.append(
    f'## Learning-rate sweep: where training stops ({len(setting.lr_seeds)} seeds, label noise '
    f'{setting.lr_noise:.0%})\n\n'
    'Final train loss and accuracy (the last epoch, train mode), test accuracy (%), and how many '
    "seeds diverged (last epoch's train loss NaN or above ln 10 = 2.303) or did not train "
    f'(diverged, or final train accuracy below {TRAINED_ACCURACY:.0%}).\n'
  )
  lines.append('| lr | ' + ' | '.join(NAMES[o] for o in setting.lr_optimizers) + ' |')
  lines.append('|---' * (1 + len(setting.lr_optimizers)) + '|')
  for lr in (f'{x:g}' for x in setting.lrs):
    cells = []
    for o in setting.lr_optimizers:
      r = table['lr'][o][lr]
      cells.append(
        f'loss {_pm(r["train_loss"], 1, ".3f")}, train {_pm(r["train_accuracy"], 100, ".1f")}, '
        f'test {_pm(r["test_accuracy"], 100, ".1f")}, diverged {r["diverged"]}/{r["runs"]}, '
        f'did not train {r["failed"]}/{r["runs"]}'
      )
    lines.append(f'| {lr} | ' + ' | '.join(cells) + ' |')
  optimizers = setting.lr_optimizers
  largest = lambda found, key: ', '.join(f'{NAMES[o]} {_opt(found[o][key])}' for o in optimizers)
  lines.append('')
  for found, what, first in (
    (table['lr']['stable'], 'with no diverged seed', 'first that diverged'),
    (table['lr']['trains'], 'at which every seed trained', 'first at which a seed did not'),
  ):
    lines.append(
      f'Largest learning rate {what} (at it and below): {largest(found, "largest_stable")}; '
      f'{first}: {largest(found, "first_diverged")}.\n'
    )
  return '\n'.join(lines) + '\n'


def _opt(x: Optional[float]) -> str:
  return 'none' if x is None else f'{x:g}'


def _log_ticks(ax, which: str, values) -> None:
  """``ax``'s ``which`` (``'x'`` or ``'y'``) axis in log scale, labelled at ``values`` only."""
  from matplotlib import ticker

  getattr(ax, f'set_{which}scale')('log')
  axis = getattr(ax, f'{which}axis')
  axis.set_major_locator(ticker.FixedLocator(values))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  axis.set_minor_locator(ticker.NullLocator())


def plot(path: pathlib.Path, table: dict, setting: Setting) -> None:
  """Accuracy against rho, final train loss against lr, accuracy against label noise."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  ax = axes[0]
  for o in setting.rho_optimizers:
    if o not in table['rho']:
      continue
    pts = [(float(r), v['test_accuracy']) for r, v in table['rho'][o].items()]
    pts = [(r, s) for r, s in pts if s['mean'] is not None]
    ax.errorbar(
      [r for r, _ in pts],
      [100 * s['mean'] for _, s in pts],
      yerr=[100 * s['std'] for _, s in pts],
      marker='o',
      capsize=3,
      label=NAMES[o],
    )
  _log_ticks(ax, 'x', setting.rhos)
  ax.set_xlabel('rho')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'Radius sweep ({len(setting.seeds)} seeds, mean ± std)')
  ax.legend()

  ax = axes[1]
  cap = 10.0
  for o in setting.lr_optimizers:
    rows = table['lr'][o]
    lrs = [float(lr) for lr in rows]
    loss = [rows[lr]['train_loss']['mean'] for lr in rows]
    shown = [cap if m is None or not math.isfinite(m) or m > cap else m for m in loss]
    (line,) = ax.plot(lrs, shown, marker='o', label=NAMES[o])
    bad = [(x, y) for x, y, r in zip(lrs, shown, rows.values(), strict=True) if r['diverged']]
    if bad:
      xs, ys = [x for x, _ in bad], [y for _, y in bad]
      ax.scatter(xs, ys, marker='x', s=80, color=line.get_color(), zorder=3)
  ax.axhline(paired.DIVERGED_LOSS, color='gray', ls='--', lw=1, label='ln 10 (diverged above)')
  _log_ticks(ax, 'x', setting.lrs)
  _log_ticks(ax, 'y', (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0))
  ax.set_xlabel('peak learning rate')
  ax.set_ylabel(f'final train loss (NaN shown at {cap:g})')
  ax.set_title(f'Learning-rate sweep ({len(setting.lr_seeds)} seeds; x: a seed diverged)')
  ax.legend()

  ax = axes[2]
  noises = [float(n) for n in table['main']]
  for i, o in enumerate(setting.optimizers):
    stats = [table['main'][f'{n:.1f}'][o]['test_accuracy'] for n in noises]
    offset = (i - (len(setting.optimizers) - 1) / 2) * 0.006
    ax.errorbar(
      [100 * (n + offset) for n in noises],
      [100 * s['mean'] if s['mean'] is not None else math.nan for s in stats],
      yerr=[100 * s['std'] if s['std'] is not None else 0 for s in stats],
      marker='o',
      capsize=3,
      label=NAMES[o],
    )
  ax.set_xlabel('label noise (%)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'Main study ({len(setting.seeds)} seeds, mean ± std)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(out: pathlib.Path, setting: Setting, runs: list, info: dict) -> str:
  """Summarizes ``runs`` into ``study.json``, ``study.md`` and ``study.png``; returns the text."""
  table = summarize(runs, setting)
  (out / 'study.json').write_text(
    json.dumps(dict(setting=setting.to_dict(), info=info, runs=runs, table=table), indent=1)
  )
  trained_seconds = sum(r.get('seconds') or 0.0 for r in runs)
  text = markdown(table, setting) + (
    f'{len(runs)} runs, {trained_seconds / 60:.1f} min of training; the invocation that wrote '
    f'this took {info["seconds"] / 60:.1f} min ({info["backend"]}, {info["devices"]} devices).\n'
  )
  (out / 'study.md').write_text(text)
  plot(out / 'study.png', table, setting)
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--smoke', action='store_true', help='a tiny run that checks the script')
  parser.add_argument('--out', default='benchmarks/results/study')
  parser.add_argument('--seeds', type=int, default=5, help='seeds of the main study and rho sweep')
  parser.add_argument('--lr-seeds', type=int, default=3, help='seeds of the learning-rate sweep')
  parser.add_argument('--epochs', type=int, default=8)
  parser.add_argument('--lr', type=float, default=0.2, help='peak lr of the main and rho parts')
  parser.add_argument('--width', type=int, default=16)
  parser.add_argument('--resume', action='store_true', help='continue from study.partial.json')
  parser.add_argument(
    '--report', action='store_true', help='rewrite study.md and study.png from study.json'
  )
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if args.report:
    data = json.loads((out / 'study.json').read_text())
    setting = Setting.from_dict(data['setting'])
    print(write_report(out, setting, data['runs'], data['info']))
    return 0
  if args.smoke:
    setting = smoke_setting()
  else:
    setting = full_setting(args.seeds, args.lr_seeds, args.epochs, args.width, args.lr)
  out.mkdir(parents=True, exist_ok=True)
  partial = out / 'study.partial.json'
  done = json.loads(partial.read_text())['runs'] if args.resume and partial.exists() else []
  save = lambda records: partial.write_text(json.dumps(dict(runs=records)))
  log = lambda line: print(line, flush=True)
  began = time.perf_counter()
  runs, _ = run_study(setting, done=done, save=save, log=log)
  info = dict(
    seconds=time.perf_counter() - began,
    runs=len(runs),
    backend=jax.default_backend(),
    devices=jax.device_count(),
    resumed_runs=len(done),
  )
  print(write_report(out, setting, runs, info))
  partial.unlink(missing_ok=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
