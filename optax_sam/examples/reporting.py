"""What a run leaves in its output folder: the metrics JSON, the PNG of the curves, the table."""

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

METRICS_FILE = 'metrics.json'
CURVES_FILE = 'curves.png'
COMPARISON_FILE = 'comparison.json'
COMPARISON_PLOT = 'comparison.png'
SHARPNESS_PLOT = 'sharpness.png'
EPOCH_KEYS = ('epoch', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'seconds')


def write_json(path: pathlib.Path, payload: Any) -> None:
  """Writes JSON through a temporary file, so a reader never sees half a file."""
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(json.dumps(payload, indent=2) + '\n')
  os.replace(tmp, path)


def summary(history: Sequence[dict]) -> dict:
  """The last epoch's metrics, plus the best test accuracy and the total time."""
  last = dict(history[-1])
  last['best_test_accuracy'] = max(h['test_accuracy'] for h in history)
  last['seconds'] = sum(h['seconds'] for h in history)
  return last


def plot_curves(path: pathlib.Path, history: Sequence[dict], title: str) -> None:
  """Loss and accuracy per epoch, train and test, in one PNG (matplotlib, Agg backend)."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  epochs = [h['epoch'] for h in history]
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
  for split, style in (('train', '-'), ('test', '--')):
    loss_ax.plot(epochs, [h[f'{split}_loss'] for h in history], style, label=split)
    acc_ax.plot(epochs, [h[f'{split}_accuracy'] for h in history], style, label=split)
  loss_ax.set(xlabel='epoch', ylabel='cross-entropy', title='loss')
  acc_ax.set(xlabel='epoch', ylabel='accuracy', title='accuracy')
  _finish(fig, (loss_ax, acc_ax), path, title)


def plot_sharpness(path: pathlib.Path, history: Sequence[dict], title: str) -> bool:
  """The measured sharpness and the SAM step's statistics per epoch, in one PNG.

  Only what the history holds is drawn: the top eigenvalue and the SAM sharpness
  where ``--sharpness-every`` measured them, the step statistics where the
  optimizer kept them. Returns whether there was anything to draw (no file otherwise).
  """
  measured = [h for h in history if 'sharpness' in h]
  stepped = [h for h in history if 'step_statistics' in h]
  if not measured and not stepped:
    return False
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  panels = 2 * bool(measured) + bool(stepped)
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
  axes = list(axes[0])
  if measured:
    eig_ax, sam_ax = axes[0], axes[1]
    epochs = [h['epoch'] for h in measured]
    values = [h['sharpness']['hessian_top_eigenvalue'] for h in measured]
    eig_ax.plot(epochs, values, 'o-', label='lambda_1')
    values = [h['sharpness']['sam_sharpness'] for h in measured]
    sam_ax.plot(epochs, values, 'o-', label='L(w + e) - L(w)')
    eig_ax.set(xlabel='epoch', ylabel='eigenvalue', title='top Hessian eigenvalue (eval mode)')
    sam_ax.set(xlabel='epoch', ylabel='loss increase', title='SAM sharpness (rho = 0.05)')
  if stepped:
    step_ax = axes[-1]
    epochs = [h['epoch'] for h in stepped]
    labels = {
      'norm_ratio': '||g_adv|| / ||g||',
      'cosine': 'cos(g, g_adv)',
      'ema_cosine': 'cos(EMA, g) (F-SAM)',
    }
    for name, label in labels.items():
      values = [h['step_statistics'][name] for h in stepped]
      if name != 'ema_cosine' or any(values):
        step_ax.plot(epochs, values, label=label)
    step_ax.set(xlabel='epoch', ylabel='epoch mean', title='SAM step statistics')
  _finish(fig, axes, path, title)
  return True


def _finish(fig, axes, path: pathlib.Path, title: str) -> None:
  """Integer epochs, grid and legend on every axis; title; save as PNG and close."""
  from matplotlib import pyplot as plt
  from matplotlib.ticker import MaxNLocator

  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_comparison(path: pathlib.Path, histories: dict[str, Sequence[dict]], title: str) -> None:
  """Test accuracy and train loss per epoch of several runs, in one PNG."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
  for name, history in histories.items():
    epochs = [h['epoch'] for h in history]
    loss_ax.plot(epochs, [h['train_loss'] for h in history], label=name)
    acc_ax.plot(epochs, [h['test_accuracy'] for h in history], label=name)
  loss_ax.set(xlabel='epoch', ylabel='cross-entropy', title='train loss')
  acc_ax.set(xlabel='epoch', ylabel='accuracy', title='test accuracy')
  _finish(fig, (loss_ax, acc_ax), path, title)


def format_table(results: dict[str, dict]) -> str:
  """A plain-text table of the final metrics of several runs.

  Example:
    >>> from optax_sam.examples import reporting
    >>> row = dict(train_loss=0.5, train_accuracy=0.8, test_accuracy=0.75,
    ...            best_test_accuracy=0.76, seconds=12.0)
    >>> print(reporting.format_table({'sam': row}))
    optimizer  train loss  train acc  test acc  best test acc  time (s)
    sam            0.5000     0.8000    0.7500         0.7600      12.0
  """
  width = max(len('optimizer'), *(len(name) for name in results))
  lines = [f'{"optimizer":<{width}}  train loss  train acc  test acc  best test acc  time (s)']
  for name, r in results.items():
    lines.append(
      f'{name:<{width}}  {r["train_loss"]:>10.4f}  {r["train_accuracy"]:>9.4f}  '
      f'{r["test_accuracy"]:>8.4f}  {r["best_test_accuracy"]:>13.4f}  {r["seconds"]:>8.1f}'
    )
  return '\n'.join(lines)
