"""How much of SAM's gain the cheaper variants keep: MNIST-1D, the example's CNN, paired seeds.

Run from the repository root::

  python -m benchmarks.cheap_study                 # the full study (docs/cheaper_sam.md)
  python -m benchmarks.cheap_study --quick --out /tmp/q   # a tiny end-to-end check

Every variant trains the example's residual CNN (``optax_sam.examples``) with
the same base optimizer (SGD with momentum 0.9, weight decay 5e-4 on kernels,
cosine learning rate from 0.05; first-stage width 16 and 8 epochs by
default, to fit the study in CPU minutes) on MNIST-1D with 0% and 20% label noise, for
the same seeds: a seed fixes the initialization, the batch order, dropout and
the noisy labels, so each variant's run is paired with SGD's and SAM's. Test
accuracy is measured at the clean weights (Momentum-SAM's ``w``); one run is
:func:`benchmarks.paired.run_one`. For each
variant and noise level the script reports the test accuracy's mean and
standard deviation over seeds, the share of SAM's gain over SGD it keeps,
``(acc - acc_SGD) / (acc_SAM - acc_SGD)``, as a ratio of the means and as the
mean and standard deviation of the per-seed ratios, the second gradients per
step (exact, from the policy), and the measured time per step relative to SGD
(median over seeds of the per-run ratio; each run's time excludes its first
epoch, which compiles).

Writes ``cheap_study.json`` (every run) and ``cheap_study.md`` (the tables)
to ``--out``.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np

from benchmarks import paired
from optax_sam.examples import config as config_lib
from optax_sam.examples import data as data_lib
from optax_sam.examples import train

# name: (Config fields, second gradients per step as a function of the run's steps)
VARIANTS = {
  'sgd': (dict(optimizer='sgd'), lambda n: 0.0),
  'sam': (dict(optimizer='sam'), lambda n: 1.0),
  'sam every(2)': (dict(optimizer='sam', sam_every=2), lambda n: math.ceil(n / 2) / n),
  'sam every(5)': (dict(optimizer='sam', sam_every=5), lambda n: math.ceil(n / 5) / n),
  'sam last 25%': (dict(optimizer='sam', sam_after=0.75), lambda n: (n - round(0.75 * n)) / n),
  'look_sam(k=5)': (dict(optimizer='looksam', sam_every=5), lambda n: math.ceil(n / 5) / n),
  'momentum_sam rho=0.1': (dict(optimizer='msam', rho=0.1), lambda n: 0.0),
  'momentum_sam rho=0.3': (dict(optimizer='msam', rho=0.3), lambda n: 0.0),
  'momentum_sam rho=1.0': (dict(optimizer='msam', rho=1.0), lambda n: 0.0),
}


def study(seeds, noises, epochs, variants, base: config_lib.Config, log=print) -> list:
  runs = []
  for noise in noises:
    for seed in seeds:
      base_run = dataclasses.replace(base, seed=seed, label_noise=noise, epochs=epochs)
      dataset = train.load_dataset(base_run)
      for name in variants:
        fields, _ = VARIANTS[name]
        config = dataclasses.replace(base_run, **fields).validate()
        result = paired.run_one(config, dataset)
        runs.append(dict(variant=name, seed=seed, label_noise=noise, **result))
        log(
          f'noise {noise:.1f} seed {seed} {name:<22} test acc {result["test_accuracy"]:.4f} '
          f'{1e3 * result["seconds_per_step"]:.2f} ms/step'
        )
  return runs


def summarize(runs: list, variants, steps: int) -> dict:
  """Per noise level and variant: the table's columns."""
  table = {}
  for noise in sorted({r['label_noise'] for r in runs}):
    by = {
      (r['variant'], r['seed']): r for r in runs if r['label_noise'] == noise
    }  # fmt: skip
    seeds = sorted({s for _, s in by})
    acc = {v: np.array([by[v, s]['test_accuracy'] for s in seeds]) for v in variants}
    secs = {v: np.array([by[v, s]['seconds_per_step'] for s in seeds]) for v in variants}
    rows = {}
    for v in variants:
      row = dict(
        **{k: paired.mean_std(acc[v])[k] for k in ('mean', 'std')},
        second_gradients=VARIANTS[v][1](steps),
        time_vs_sgd=float(np.median(secs[v] / secs['sgd'])) if 'sgd' in acc else None,
      )
      if 'sgd' in acc and 'sam' in acc:
        gain = acc['sam'] - acc['sgd']
        with np.errstate(divide='ignore', invalid='ignore'):
          per_seed = (acc[v] - acc['sgd']) / gain
        finite = per_seed[np.isfinite(per_seed)]
        mean_gain = acc['sam'].mean() - acc['sgd'].mean()
        row |= dict(
          share_of_means=float((acc[v].mean() - acc['sgd'].mean()) / mean_gain)
          if mean_gain != 0
          else None,
          share_per_seed_mean=float(finite.mean()) if len(finite) else None,
          share_per_seed_std=float(finite.std(ddof=1)) if len(finite) > 1 else None,
          seeds_with_gain=int(np.sum(gain > 0)),
        )
      rows[v] = row
    table[f'{noise:.1f}'] = rows
  return table


def markdown(table: dict, seeds: int) -> str:
  def fmt(x, spec):
    return '–' if x is None else format(x, spec)

  lines = []
  for noise, rows in table.items():
    lines.append(f'**Label noise {float(noise):.0%}** ({seeds} seeds)\n')
    lines.append(
      '| variant | test acc (mean ± std) | share of SAM gain (of means) '
      '| per-seed share (mean ± std) | 2nd gradients / step | time / step vs SGD |'
    )
    lines.append('|---|---|---|---|---|---|')
    for name, r in rows.items():
      lines.append(
        f'| {name} | {100 * r["mean"]:.2f} ± {100 * r["std"]:.2f} '
        f'| {fmt(r.get("share_of_means"), ".2f")} '
        f'| {fmt(r.get("share_per_seed_mean"), ".2f")} ± {fmt(r.get("share_per_seed_std"), ".2f")} '
        f'| {r["second_gradients"]:.2f} | {fmt(r["time_vs_sgd"], ".2f")}x |'
      )
    sam = rows.get('sam', {})
    if 'seeds_with_gain' in sam:
      lines.append(f'\nSAM beat SGD on {sam["seeds_with_gain"]} of {seeds} seeds.\n')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='a tiny run that checks the script')
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--epochs', type=int, default=8)
  parser.add_argument('--width', type=int, default=16)
  parser.add_argument('--out', default='benchmarks/results/cheap_study')
  args = parser.parse_args(argv)
  base = config_lib.Config(width=args.width)
  seeds, noises, epochs, variants = range(args.seeds), (0.0, 0.2), args.epochs, list(VARIANTS)
  if args.quick:  # 2 seeds, 1 epoch, a small CNN on 300 examples: checks the pipeline only
    base = dataclasses.replace(base, width=4, num_samples=300, batch_size=60)
    seeds, noises, epochs = range(2), (0.0, 0.2), 1
    variants = ['sgd', 'sam', 'sam every(2)', 'momentum_sam rho=0.3']
  began = time.perf_counter()
  runs = study(seeds, noises, epochs, variants, base)
  steps = epochs * (int(0.8 * (base.num_samples or data_lib.MNIST1D_SAMPLES)) // base.batch_size)
  table = summarize(runs, variants, steps)
  seconds = time.perf_counter() - began
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  setup = dict(
    seeds=len(seeds), epochs=epochs, steps=steps, noises=list(noises), seconds=seconds,
    config=base.to_dict(), backend=jax.default_backend(),
  )  # fmt: skip
  (out / 'cheap_study.json').write_text(json.dumps(dict(setup=setup, runs=runs, table=table)))
  text = markdown(table, len(seeds)) + f'\n{len(runs)} runs in {seconds / 60:.1f} min.\n'
  (out / 'cheap_study.md').write_text(text)
  print(text)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
