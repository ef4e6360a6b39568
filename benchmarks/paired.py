"""What the accuracy studies share: one training run of the example, and paired-seed summaries.

A study (``benchmarks.cheap_study``, ``benchmarks.study``) trains the example's
ResNet (``optax_sam.examples``) several times with the same seeds: a seed
fixes the initialization, the batch order, dropout and the noisy labels, so two
optimizers' runs with one seed differ only by the optimizer. :func:`run_one`
trains one run with the example's own pieces (``train.create_model``, the
shared optimizer, ``train.train_step``, ``train.evaluate``,
``train.measure_sharpness``); :func:`mean_std` and :func:`paired_difference`
summarize a metric over seeds.
"""

import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_sam.examples import config as config_lib
from optax_sam.examples import data as data_lib
from optax_sam.examples import train

# Training "stopped" when the last epoch's mean train loss is not finite or above this: the loss
# of a uniform guess over MNIST-1D's (and CIFAR-10's) ten classes.
DIVERGED_LOSS = math.log(10)


def run_one(
  config: config_lib.Config, dataset: data_lib.Dataset, *, sharpness: bool = False
) -> dict:
  """Trains one run of the example; returns its final metrics.

  Args:
    config: a validated config (its ``seed`` and ``label_noise`` must be the ones ``dataset``
      was loaded with).
    dataset: the data, from ``train.load_dataset(config)``.
    sharpness: also measure the top Hessian eigenvalue (and the SAM sharpness) of the final
      clean weights with ``train.measure_sharpness``, on the first
      ``train.SHARPNESS_EXAMPLES`` training examples (skipped when training diverged).

  Returns:
    ``test_accuracy`` and ``test_loss`` (clean weights, eval mode), ``train_loss`` and
    ``train_accuracy`` (the last epoch's means over its steps, in train mode, on the possibly
    noisy labels), ``diverged`` (the train loss is not finite or above :data:`DIVERGED_LOSS`),
    ``epochs_run`` (training stops after an epoch whose loss is not finite),
    ``seconds_per_step`` (excluding the first epoch, which compiles, unless there is only one)
    and, with ``sharpness``, ``hessian_top_eigenvalue``, ``hessian_residual`` and
    ``sam_sharpness`` (``None`` when not measured).
  """
  steps_per_epoch = len(dataset.y_train) // config.batch_size
  model = train.create_model(config, dataset)
  schedule_steps = steps_per_epoch if train._needs_run_length(config) else 1
  tx = train._shared_optimizer(train._optimizer_key(config), schedule_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  timed, timed_steps, epochs_run = 0.0, 0, 0
  train_loss, train_accuracy = math.nan, math.nan
  for epoch in range(config.epochs):
    began = time.perf_counter()
    losses, corrects = [], []
    for x, y in data_lib.train_batches(
      dataset.x_train, dataset.y_train, config.batch_size, config.seed, epoch
    ):
      loss, correct, _ = train.train_step(model, optimizer, x, y)
      losses.append(loss)
      corrects.append(correct)
    train_loss = float(jnp.mean(jnp.stack(losses)))
    train_accuracy = float(jnp.sum(jnp.stack(corrects))) / (steps_per_epoch * config.batch_size)
    epochs_run += 1
    if epoch > 0 or config.epochs == 1:
      timed += time.perf_counter() - began
      timed_steps += steps_per_epoch
    if not math.isfinite(train_loss):
      break  # NaN stays NaN: the remaining epochs would only cost time
  clean = train.clean_model(model, optimizer)
  test_loss, test_accuracy = train.evaluate(clean, dataset.x_test, dataset.y_test)
  diverged = not math.isfinite(train_loss) or train_loss > DIVERGED_LOSS
  result = dict(
    test_accuracy=test_accuracy,
    test_loss=test_loss,
    train_loss=train_loss,
    train_accuracy=train_accuracy,
    diverged=diverged,
    epochs_run=epochs_run,
    seconds_per_step=timed / timed_steps if timed_steps else None,
  )
  if sharpness:
    measured = dict(hessian_top_eigenvalue=None, hessian_residual=None, sam_sharpness=None)
    if not diverged:
      n = train.SHARPNESS_EXAMPLES
      values = train.measure_sharpness(
        clean,
        jnp.asarray(dataset.x_train[:n]),
        jnp.asarray(dataset.y_train[:n]),
        jax.random.key(config.seed),
        train.SHARPNESS_LANCZOS_STEPS,
      )
      measured = {name: float(v) for name, v in values.items()}
    result |= measured
  return result


def mean_std(values) -> dict:
  """Mean and sample standard deviation (``ddof=1``) of the finite values.

  Returns:
    ``mean``, ``std`` (0 for one value) and ``n`` (how many were finite); ``mean`` and
    ``std`` are ``None`` when none is.

  Example:
    >>> from benchmarks import paired
    >>> paired.mean_std([1.0, 2.0, 3.0, float('nan')])
    {'mean': 2.0, 'std': 1.0, 'n': 3}
  """
  x = np.array([np.nan if v is None else v for v in values], dtype=float)
  x = x[np.isfinite(x)]
  if not len(x):
    return dict(mean=None, std=None, n=0)
  return dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else 0.0, n=len(x))


def paired_difference(a, b, *, threshold: Optional[float] = None) -> dict:
  """The per-seed difference ``a - b`` of two optimizers' runs with the same seeds.

  A difference whose mean is not larger in size than the standard deviation of
  the per-seed differences (their spread across seeds) is reported as
  ``'no difference'``; so is any difference with fewer than two seeds.

  Args:
    a: the metric of the first optimizer, one value per seed.
    b: the second optimizer's, for the same seeds in the same order.
    threshold: a spread to compare with instead of the differences' own standard deviation.

  Returns:
    ``mean`` and ``std`` (``ddof=1``) of ``a - b`` over the seeds where both are finite, ``n``,
    ``wins`` (seeds where ``a > b``) and ``verdict``: ``'higher'``, ``'lower'`` or
    ``'no difference'``.

  Example:
    >>> from benchmarks import paired
    >>> paired.paired_difference([0.90, 0.92, 0.91], [0.89, 0.90, 0.90])['verdict']
    'higher'
    >>> paired.paired_difference([0.90, 0.88, 0.91], [0.89, 0.90, 0.90])['verdict']
    'no difference'
  """
  a, b = (np.array([np.nan if v is None else v for v in x], dtype=float) for x in (a, b))
  if a.shape != b.shape:
    raise ValueError(f'paired values need the same seeds: got {len(a)} and {len(b)}')
  keep = np.isfinite(a) & np.isfinite(b)
  d = a[keep] - b[keep]
  if len(d) == 0:
    return dict(mean=None, std=None, n=0, wins=0, verdict='no difference')
  mean = float(d.mean())
  std = float(d.std(ddof=1)) if len(d) > 1 else None
  spread = threshold if threshold is not None else std
  if spread is None or abs(mean) <= spread:
    verdict = 'no difference'
  else:
    verdict = 'higher' if mean > 0 else 'lower'
  return dict(mean=mean, std=std, n=len(d), wins=int(np.sum(d > 0)), verdict=verdict)
