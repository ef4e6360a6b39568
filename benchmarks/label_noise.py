"""SAM against SGD under label noise, trained until SGD memorizes the wrong labels.

MNIST-1D (``optax_sam.examples.data``: 4000 training and 1000 test signals),
a fraction of the training labels replaced by a class drawn uniformly from the
other nine (the test labels are clean). A fixed tenth of the training set,
with its noisy labels, is held out as the validation split a user would pick
an epoch on. A small 1-D CNN without BatchNorm or dropout, in plain JAX, is
trained long enough that SGD fits most of the wrong labels; each run records
the final, peak and validation-selected test accuracy, the training accuracy on
the wrongly labelled examples (how much noise was memorized), the expected
calibration error and the top Hessian eigenvalue at the end.

The seeds of one optimizer and noise level train side by side under
``jax.vmap`` in one compiled program (a group). A seed fixes the
initialization, the batch order, which labels are wrong and the noise of a
random optimizer (:func:`own_keys`), so the runs of one seed differ only by the
optimizer and the comparisons are paired. The JSON is
written after every group; ``--resume`` skips the runs it holds, ``--report``
renders the tables and plots from it without training.

Optimizers are given as ``name``, ``name:rho`` or ``name:rho:m`` (``m``: the
m-sharpness group size, :func:`optax_sam.micro_batches` with the vmap route;
omitted, the whole batch is perturbed at once). Names: ``sgd``, ``sgd-2x``
(SGD for twice the epochs, as many gradient evaluations as SAM), ``sam``,
``usam``, ``stablesam``, ``fsam``, ``gsam``, ``asam``, ``looksam``, ``msam``,
``sam-every5`` (SAM on every fifth step) and ``sam-after`` (SAM in the second
half of the run only).
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from benchmarks import paired as paired_lib
from optax_sam._src import aliases
from optax_sam.examples import calibration
from optax_sam.examples import config as config_lib
from optax_sam.examples import data as data_lib

RESULTS = pathlib.Path(__file__).resolve().parent / 'results' / 'label_noise'
NUM_CLASSES = 10
ECE_BINS = calibration.ECE_BINS
SHARPNESS_EXAMPLES = 512
LANCZOS_STEPS = 20
CURVE_EXAMPLES = 1024  # training examples whose accuracy is recorded after every epoch
OPTIMIZER_STREAM = 1000  # fold_in(run key, 1000 + i): the i-th PRNG key of an optimizer's state
NAMES = (
  'sgd',
  'sgd-2x',
  'sam',
  'usam',
  'stablesam',
  'fsam',
  'gsam',
  'asam',
  'looksam',
  'msam',
  'sam-every5',
  'sam-after',
  'wsam',
  'vasso',
  'gcsam',
  'unifiedsam',
  'lookbehind',
  'sampa',
  'mrwp',  # its rho is sigma, the noise's scale relative to each filter's norm
  'marwp',
  'bsam',  # its own optimizer (no SGD base): peak learning rate lr / (1 - momentum)
)
# Radii when an optimizer is named without one.
DEFAULT_RHO = {'asam': 1.0, 'msam': 0.3}
REFERENCE_RHO = 0.1  # the SAM every other optimizer is compared with at 40% noise
MAIN_NOISE = 0.4
LOOKBEHIND_K = config_lib.library_default(optax_sam.lookbehind_sam, 'k')  # inner steps per step


@dataclasses.dataclass(frozen=True)
class Setting:
  """What every run of a benchmark shares.

  Attributes:
    epochs: training epochs (``sgd-2x`` trains twice as many).
    width: channels of the CNN's first convolution (doubled in the third).
    lr: peak learning rate of SGD (cosine decay to 0 over the run).
    momentum: SGD momentum.
    weight_decay: L2 weight decay on the kernels, in the base optimizer.
    batch_size: examples per step.
    validation: training examples held out, with their noisy labels, to select an epoch on.
    seeds: the seeds.
    noise: the label-noise fractions.
    optimizers: the optimizer specs (``name[:rho[:m]]``) trained at every noise level.
    variants: more optimizer specs, trained at :data:`MAIN_NOISE` only.
  """

  epochs: int = 60
  width: int = 32
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 0.0
  batch_size: int = 128
  validation: int = 400
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  noise: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
  optimizers: tuple[str, ...] = ('sgd', 'sam:0.05', 'sam:0.1', 'sam:0.2', 'sam:0.1:8')
  variants: tuple[str, ...] = (
    'fsam:0.1',
    'stablesam:0.1',
    'usam:0.1',
    'gsam:0.1',
    'asam:1.0',
    'sam-every5:0.1',
    'sam-after:0.1',
    'looksam:0.1',
    'msam:0.3',
    'sgd-2x',
  )

  def to_dict(self) -> dict:
    """The setting as JSON-ready values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def smoke_setting() -> Setting:
  """Tiny: two seeds, SGD and SAM at two noise levels, m-sharpness at one, two epochs."""
  return Setting(
    epochs=2,
    width=4,
    seeds=(0, 1),
    noise=(0.0, 0.4),
    optimizers=('sgd', 'sam:0.1'),
    variants=('sam:0.1:32',),
  )


@dataclasses.dataclass(frozen=True)
class Spec:
  """One optimizer of the benchmark: its name, radius and m-sharpness group size."""

  name: str
  rho: float
  m: Optional[int]  # None: the whole batch perturbed at once (SAM variants) or no SAM at all

  @property
  def label(self) -> str:
    """``name``, ``name rho=R`` or ``name rho=R m=M``, as the tables print it."""
    text = self.name if self.name in ('sgd', 'sgd-2x') else f'{self.name} rho={self.rho:g}'
    return text if self.m is None else f'{text} m={self.m}'


def parse_spec(text: str) -> Spec:
  """Parses ``name``, ``name:rho`` or ``name:rho:m``.

  Example:
    >>> from benchmarks import label_noise
    >>> label_noise.parse_spec('sam:0.1:8')
    Spec(name='sam', rho=0.1, m=8)
    >>> label_noise.parse_spec('asam').rho
    1.0
  """
  parts = text.strip().lower().split(':')
  name = parts[0]
  if name not in NAMES or len(parts) > 3:
    raise ValueError(f'unknown optimizer {text!r}: name[:rho[:m]] with name one of {NAMES}')
  if name in ('sgd', 'sgd-2x'):
    if len(parts) > 1:
      raise ValueError(f'{name} takes no radius: {text!r}')
    return Spec(name, 0.0, None)
  rho = float(parts[1]) if len(parts) > 1 and parts[1] else DEFAULT_RHO.get(name, REFERENCE_RHO)
  m = int(parts[2]) if len(parts) > 2 else None
  if m is not None and name in ('looksam', 'msam', 'sam-every5', 'sam-after'):
    raise ValueError(f'{name} runs with the whole batch only: {text!r}')
  return Spec(name, rho, m)


# --- Data ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
  """Training, validation and test arrays; the labels of each seed (noise differs per seed)."""

  x_train: np.ndarray  # [n, 40, 1]
  clean_train: np.ndarray  # [n]
  x_val: np.ndarray
  clean_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_data(validation: int) -> Data:
  """MNIST-1D, the last ``validation`` training examples held out (a fixed split)."""
  ds = data_lib.load_mnist1d()
  n = len(ds.y_train) - validation
  return Data(ds.x_train[:n], ds.y_train[:n], ds.x_train[n:], ds.y_train[n:], ds.x_test, ds.y_test)


def noisy(data: Data, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The seed's noisy training and validation labels (each wrong label another class)."""
  if not noise:
    return data.clean_train.copy(), data.clean_val.copy()
  y = np.concatenate([data.clean_train, data.clean_val])
  y = data_lib.noisy_labels(y, NUM_CLASSES, noise, seed)
  return y[: len(data.clean_train)], y[len(data.clean_train) :]


def batch_orders(n: int, batch_size: int, seed: int, epochs: int) -> np.ndarray:
  """``[epochs, steps, batch_size]`` indices: each epoch a permutation (as the example's)."""
  steps = n // batch_size
  orders = [
    np.random.default_rng([seed, 2, e]).permutation(n)[: steps * batch_size] for e in range(epochs)
  ]
  return np.stack(orders).reshape(epochs, steps, batch_size).astype(np.int32)


# --- Model ------------------------------------------------------------------------------------


def init_params(key: jax.Array, width: int) -> dict:
  """A 1-D CNN for 40-sample signals: four ReLU convolutions (the second and third halve the
  length and double the channels), global average pooling, a linear classifier. He-normal
  kernels, zero biases."""
  shapes = {
    'conv1': (5, 1, width),
    'conv2': (5, width, 2 * width),
    'conv3': (3, 2 * width, 4 * width),
    'conv4': (3, 4 * width, 4 * width),
  }
  keys = jax.random.split(key, len(shapes) + 1)
  params = {}
  for k, (name, shape) in zip(keys[:-1], shapes.items(), strict=True):
    fan_in = shape[0] * shape[1]
    kernel = jax.random.normal(k, shape) * math.sqrt(2.0 / fan_in)
    params[name] = {'kernel': kernel, 'bias': jnp.zeros(shape[-1])}
  head = jax.random.normal(keys[-1], (4 * width, NUM_CLASSES)) / math.sqrt(4 * width)
  params['head'] = {'kernel': head, 'bias': jnp.zeros(NUM_CLASSES)}
  return params


def _conv(x: jax.Array, layer: dict, stride: int) -> jax.Array:
  """A 'SAME' 1-D convolution and ReLU, as a matrix product over stacked shifted copies.

  XLA:CPU runs a convolution inside a loop (the training's ``lax.scan``) on a
  generic kernel many times slower than its fast one (see
  ``optax_sam/_src/cpu_convolutions.py``); slices and a matrix product are fast
  anywhere.
  """
  width = layer['kernel'].shape[0]
  out = -(-x.shape[1] // stride)
  total = max((out - 1) * stride + width - x.shape[1], 0)  # XLA's 'SAME' padding
  padded = jnp.pad(x, ((0, 0), (total // 2, total - total // 2), (0, 0)))
  span = (out - 1) * stride + 1
  patches = jnp.concatenate([padded[:, i : i + span : stride] for i in range(width)], axis=-1)
  kernel = layer['kernel'].reshape(-1, layer['kernel'].shape[-1])
  return jax.nn.relu(patches @ kernel + layer['bias'])


def apply(params: dict, x: jax.Array) -> jax.Array:
  """Logits of ``x`` shaped ``[batch, 40, 1]``."""
  for name, stride in (('conv1', 1), ('conv2', 2), ('conv3', 2), ('conv4', 1)):
    x = _conv(x, params[name], stride)
  return jnp.mean(x, axis=1) @ params['head']['kernel'] + params['head']['bias']


def loss_fn(params: dict, batch: tuple) -> jax.Array:
  """Mean cross-entropy of ``batch = (x, y)``."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


# --- Optimizers -------------------------------------------------------------------------------


def make_optimizer(spec: Spec, setting: Setting, steps: int) -> optax.GradientTransformation:
  """SGD with momentum, weight decay on the kernels and a cosine schedule over ``steps``, wrapped
  in the SAM variant ``spec`` names (``sgd``: the base optimizer itself)."""
  # Lookbehind-SAM's base optimizer takes k steps per training step: its schedule spans them.
  inner = LOOKBEHIND_K if spec.name == 'lookbehind' else 1
  lr = optax.cosine_decay_schedule(setting.lr, decay_steps=inner * steps)
  kernels = lambda params: jax.tree.map(lambda w: w.ndim > 1, params)
  base = optax.chain(
    optax.add_decayed_weights(setting.weight_decay, mask=kernels),
    optax.sgd(lr, momentum=setting.momentum),
  )
  name, rho = spec.name, spec.rho
  if name in ('sgd', 'sgd-2x'):
    return base
  if name == 'sam-every5':
    return optax_sam.sam(base, rho, when=optax_sam.every(5))
  if name == 'sam-after':
    return optax_sam.sam(base, rho, when=optax_sam.after(steps // 2))
  if name == 'wsam':  # the decoupled sharpness term at the base's learning rate
    return optax_sam.wsam(base, rho, learning_rate=lr)
  if name == 'bsam':  # its own optimizer; its first step as long as SGD's with momentum (s_0 = 1)
    data_size = steps // epochs_of(spec, setting) * setting.batch_size  # the epoch's examples
    peak = setting.lr / (1 - setting.momentum)
    schedule = optax.cosine_decay_schedule(peak, decay_steps=steps)
    return config_lib.bsam_for_sgd(schedule, rho, setting.momentum, setting.weight_decay, data_size)
  if name in aliases.VARIANTS:  # the library's named variants, with their defaults
    return aliases.VARIANTS[name](base, rho)
  raise ValueError(f'unknown optimizer {name!r}')


def epochs_of(spec: Spec, setting: Setting) -> int:
  """The run's epochs: twice the setting's for ``sgd-2x``."""
  return 2 * setting.epochs if spec.name == 'sgd-2x' else setting.epochs


def gradient_evaluations(spec: Spec, steps: int) -> int:
  """Minibatch gradients a run takes (an m-sharpness step counts as two, like any SAM step)."""
  if spec.name in ('sgd', 'sgd-2x', 'msam'):
    return steps
  if spec.name in ('sam-every5', 'looksam'):
    return steps + len(range(0, steps, 5))
  if spec.name == 'sam-after':
    return steps + (steps - steps // 2)
  if spec.name == 'lookbehind':  # the clean gradient and k at the accumulated ascents
    return (1 + LOOKBEHIND_K) * steps
  return 2 * steps


# --- Training ---------------------------------------------------------------------------------


def own_keys(state: Any, key: jax.Array) -> Any:
  """``state`` with each PRNG key of the optimizer (m-RWP's noise, bSAM's samples) the run's own.

  An alias draws from its ``seed`` argument, the same for every run of a group; folded here from
  the run's ``key``, the seeds differ in their noise as they do in initialization, batch order
  and labels. A state without keys is returned as it is.
  """
  paths = [path for path, _ in optax.tree_utils.tree_get_all_with_path(state, 'key')]
  for i, path in enumerate(paths):
    fresh = jax.random.key_data(jax.random.fold_in(key, OPTIMIZER_STREAM + i))
    state = optax.tree_utils.tree_set(state, lambda p, _, path=path: p == path, key=fresh)
  return state


def _accuracy(params, x, y, mask=None):
  correct = (jnp.argmax(apply(params, x), -1) == y).astype(jnp.float32)
  if mask is None:
    return jnp.mean(correct)
  return jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def build_train(spec: Spec, setting: Setting, data: Data, epochs: int):
  """The compiled training of one group: seeds side by side under ``jax.vmap``.

  Returns:
    ``train(keys, y_train, y_val, orders)`` with leading seed axes, returning the final clean
    parameters, the final test logits and per-epoch curves ``[seeds, epochs]``.
  """
  steps_per_epoch = (len(data.clean_train)) // setting.batch_size
  tx = make_optimizer(spec, setting, epochs * steps_per_epoch)
  x_train = jnp.asarray(data.x_train)
  x_val, x_test = jnp.asarray(data.x_val), jnp.asarray(data.x_test)
  y_test = jnp.asarray(data.y_test)
  clean_train = jnp.asarray(data.clean_train)
  grad = jax.grad(loss_fn)
  is_sam = spec.name not in ('sgd', 'sgd-2x')
  # Momentum-SAM holds perturbed weights; every other optimizer here holds the clean ones.
  clean_of = optax_sam.clean_params if spec.name == 'msam' else (lambda params, state: params)

  def step(carry, indices):
    params, state, y_train = carry
    previous, index = indices
    batch = (x_train[index], y_train[index])
    if spec.name == 'sampa':  # the perturbed point on the previous batch, as the official loop
      pair = optax_sam.batch_pair(grad, (x_train[previous], y_train[previous]), batch)
      updates, state = tx.update(None, state, params, grad_fn=pair)
    elif spec.m is not None:
      groups = optax_sam.micro_batches(grad, batch, spec.m, route='vmap')
      updates, state = tx.update(None, state, params, grad_fn=groups)
    elif is_sam and spec.name != 'msam':
      g = grad(params, batch)
      updates, state = tx.update(g, state, params, grad_fn=lambda p: grad(p, batch))
    else:
      updates, state = tx.update(grad(params, batch), state, params)
    return (optax.apply_updates(params, updates), state, y_train), None

  def one(key, y_train, y_val, orders):
    params = init_params(key, setting.width)
    state = own_keys(tx.init(params), key)
    wrong = (y_train != clean_train).astype(jnp.float32)

    def epoch(carry, order):
      previous = jnp.concatenate([order[:1], order[:-1]])  # the first batch pairs with itself
      carry, _ = jax.lax.scan(step, carry, (previous, order))
      params, state, _ = carry
      clean = clean_of(params, state)
      # Per epoch, the training accuracies on the first CURVE_EXAMPLES examples only (cheaper).
      sub = slice(0, CURVE_EXAMPLES)
      curve = dict(
        test_accuracy=_accuracy(clean, x_test, y_test),
        val_accuracy=_accuracy(clean, x_val, y_val),
        train_accuracy=_accuracy(clean, x_train[sub], y_train[sub]),
        noisy_train_accuracy=_accuracy(clean, x_train[sub], y_train[sub], wrong[sub]),
      )
      return carry, curve

    (params, state, _), curves = jax.lax.scan(epoch, (params, state, y_train), orders)
    clean = clean_of(params, state)
    final = dict(
      train_accuracy=_accuracy(clean, x_train, y_train),
      noisy_train_accuracy=_accuracy(clean, x_train, y_train, wrong),
    )
    return clean, apply(clean, x_test), curves, final

  return jax.jit(jax.vmap(one))


@jax.jit
def _top_eigenvalues(params, x, y, keys):
  def one(p, yy, key):
    r = optax_sam.sharpness.hessian_eigenvalues(
      loss_fn, p, (x, yy), key=key, k=1, num_steps=LANCZOS_STEPS
    )
    return r.eigenvalues[0]

  return jax.vmap(one)(params, y, keys)


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
  """Expected calibration error of the softmax's top class, ``bins`` equal-width bins (the
  example's :func:`~optax_sam.examples.calibration.expected_calibration_error` of the softmax).

  Example:
    >>> import numpy as np
    >>> from benchmarks import label_noise
    >>> logits = np.log(np.array([[0.9, 0.1], [0.9, 0.1]]))  # confidence 0.9, half right
    >>> round(label_noise.expected_calibration_error(logits, np.array([0, 1])), 6)
    0.4
  """
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  return calibration.expected_calibration_error(p, labels, bins)


_COMPILED: dict = {}


def run_group(spec: Spec, noise: float, seeds: Sequence[int], setting: Setting, data: Data):
  """Trains the seeds of one optimizer and noise level together; returns one dict per run."""
  epochs = epochs_of(spec, setting)
  n = len(data.clean_train)
  steps = epochs * (n // setting.batch_size)
  began = time.perf_counter()
  labels = [noisy(data, noise, s) for s in seeds]
  y_train = np.stack([t for t, _ in labels])
  y_val = np.stack([v for _, v in labels])
  orders = np.stack([batch_orders(n, setting.batch_size, s, epochs) for s in seeds])
  key = (spec, setting, epochs, id(data))
  if key not in _COMPILED:  # one program per optimizer: the noise level only changes the labels
    _COMPILED[key] = build_train(spec, setting, data, epochs)
  train = _COMPILED[key]
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  params, logits, curves, final = train(keys, jnp.asarray(y_train), jnp.asarray(y_val), orders)
  top = _top_eigenvalues(
    params,
    jnp.asarray(data.x_train[:SHARPNESS_EXAMPLES]),
    jnp.asarray(y_train[:, :SHARPNESS_EXAMPLES]),
    keys,
  )
  curves, final = jax.tree.map(np.asarray, (curves, final))
  logits, top = np.asarray(logits), np.asarray(top)
  seconds = (time.perf_counter() - began) / len(seeds)
  runs = []
  for i, seed in enumerate(seeds):
    test, val = curves['test_accuracy'][i], curves['val_accuracy'][i]
    selected = int(np.argmax(val))  # the first epoch with the best noisy validation accuracy
    runs.append(
      dict(
        optimizer=spec.name,
        label=spec.label,
        rho=spec.rho,
        m=spec.m,
        noise=noise,
        seed=int(seed),
        epochs=epochs,
        final_test_accuracy=float(test[-1]),
        peak_test_accuracy=float(test.max()),
        peak_epoch=int(np.argmax(test)) + 1,
        selected_test_accuracy=float(test[selected]),
        selected_epoch=selected + 1,
        final_val_accuracy=float(val[-1]),
        train_accuracy=float(final['train_accuracy'][i]),
        # No label is wrong at noise 0: nothing to memorize, no value.
        noisy_train_accuracy=float(final['noisy_train_accuracy'][i]) if noise else None,
        ece=expected_calibration_error(logits[i], data.y_test),
        top_eigenvalue=float(top[i]),
        gradient_evaluations=gradient_evaluations(spec, steps),
        seconds=seconds,
        curves={k: [round(float(v), 4) for v in c[i]] for k, c in curves.items()},
      )
    )
  return runs


# --- Results ----------------------------------------------------------------------------------


def run_key(run: dict) -> tuple:
  """What identifies a run in the JSON (for ``--resume``)."""
  return (run['optimizer'], float(run['rho']), run['m'], float(run['noise']), run['seed'])


def save(path: pathlib.Path, document: dict) -> None:
  """Writes the JSON through a temporary file (a killed run never leaves half a file)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(document, indent=1))
  os.replace(tmp, path)


mean_std = paired_lib.mean_std  # mean and sample std of the finite values


def paired(a: dict, b: dict) -> dict:
  """Paired difference ``a - b`` over the seeds both have (``{seed: value}``).

  ``verdict`` is ``higher`` or ``lower`` only when the mean difference is larger than the
  standard deviation of the per-seed differences; ``wins`` counts the seeds where ``a > b``.

  Example:
    >>> from benchmarks import label_noise
    >>> d = label_noise.paired({0: 0.80, 1: 0.82, 2: 0.84}, {0: 0.79, 1: 0.80, 2: 0.81})
    >>> round(d['mean'], 6), round(d['std'], 6), d['wins'], d['verdict']
    (0.02, 0.01, 3, 'higher')
  """
  finite = lambda v: v is not None and math.isfinite(v)
  seeds = sorted(s for s in set(a) & set(b) if finite(a[s]) and finite(b[s]))
  diffs = [a[s] - b[s] for s in seeds]
  summary = mean_std(diffs)
  mean, std = summary['mean'], summary['std']
  verdict = 'no difference'
  if mean is not None and len(diffs) > 1 and abs(mean) > std and mean != 0:
    verdict = 'higher' if mean > 0 else 'lower'
  return dict(summary, wins=sum(d > 0 for d in diffs), verdict=verdict, seeds=seeds)


METRICS = (
  ('final_test_accuracy', 'final test'),
  ('peak_test_accuracy', 'peak test'),
  ('selected_test_accuracy', 'selected test'),
  ('noisy_train_accuracy', 'noisy-label train acc.'),
  ('ece', 'ECE'),
  ('top_eigenvalue', 'top eigenvalue'),
)


def _by(runs: list, **where) -> dict:
  return {r['seed']: r for r in runs if all(r[k] == v for k, v in where.items())}


def _labels(runs: list, noise: Optional[float] = None) -> list:
  seen = []
  for r in runs:
    if (noise is None or r['noise'] == noise) and r['label'] not in seen:
      seen.append(r['label'])
  order = {name: i for i, name in enumerate(NAMES)}
  return sorted(seen, key=lambda lab: (order.get(lab.split()[0], 99), lab))


def _pct(x: Optional[float], digits: int = 1) -> str:
  return '-' if x is None else f'{100 * x:.{digits}f}'


def _pm(summary: dict, scale: float = 100.0, digits: int = 1) -> str:
  if summary['mean'] is None:
    return '-'
  return f'{scale * summary["mean"]:+.{digits}f} ± {scale * summary["std"]:.{digits}f}'


def _value(summary: dict, scale: float = 100.0, digits: int = 1) -> str:
  if summary['mean'] is None:
    return '-'
  return f'{scale * summary["mean"]:.{digits}f} ± {scale * summary["std"]:.{digits}f}'


def reference_sam(runs: list, noise: float) -> Optional[str]:
  """The label of the SAM the other optimizers are compared with: whole-batch SAM at
  :data:`REFERENCE_RHO` when it ran, else the first whole-batch SAM."""
  labels = [lab for lab in _labels(runs, noise) if lab.startswith('sam rho=') and 'm=' not in lab]
  wanted = f'sam rho={REFERENCE_RHO:g}'
  return wanted if wanted in labels else (labels[0] if labels else None)


def summarize(runs: list) -> dict:
  """Per noise level and optimizer: every metric's mean ± std, and paired differences vs SGD
  and vs the reference SAM (with the share of SAM's gain over SGD)."""
  table = {}
  for noise in sorted({r['noise'] for r in runs}):
    rows = {}
    sgd = _by(runs, noise=noise, label='sgd')
    ref = reference_sam(runs, noise)
    sam = _by(runs, noise=noise, label=ref) if ref else {}
    for label in _labels(runs, noise):
      mine = _by(runs, noise=noise, label=label)
      row = {'n': len(mine), 'seconds': mean_std([r['seconds'] for r in mine.values()])}
      row['gradient_evaluations'] = next(iter(mine.values()))['gradient_evaluations']
      for metric, _ in METRICS:
        values = {s: r[metric] for s, r in mine.items()}
        row[metric] = mean_std(values.values())
        if label != 'sgd' and sgd:
          row.setdefault('vs_sgd', {})[metric] = paired(
            values, {s: r[metric] for s, r in sgd.items()}
          )
        if label != ref and sam:
          row.setdefault('vs_sam', {})[metric] = paired(
            values, {s: r[metric] for s, r in sam.items()}
          )
      if sgd and sam and label not in ('sgd', ref):
        gain = paired(
          {s: r['final_test_accuracy'] for s, r in sam.items()},
          {s: r['final_test_accuracy'] for s, r in sgd.items()},
        )
        mine_gain = row['vs_sgd']['final_test_accuracy']
        if gain['mean'] and mine_gain['mean'] is not None:
          row['share_of_sam_gain'] = dict(
            mean=mine_gain['mean'] / gain['mean'], std=mine_gain['std'] / abs(gain['mean'])
          )
      rows[label] = row
    table[f'{noise:g}'] = dict(reference_sam=ref, rows=rows)
  return table


def render_markdown(document: dict) -> str:
  """The tables of ``label_noise.md``."""
  runs, setting = document['runs'], document['setting']
  table = summarize(runs)
  out = [
    '# Label-noise benchmark: results',
    '',
    f'Written by `python -m benchmarks.label_noise` ({len(runs)} runs; '
    f'{document["info"].get("seconds", 0) / 60:.1f} min of training in total). Setting: '
    + ', '.join(f'{k}={setting[k]}' for k in (*SHARED, 'seeds'))
    + '. Accuracies in percent, mean ± standard deviation over seeds; differences are paired '
    '(per seed, then mean ± std), "k/n" the seeds where the first is higher. A difference '
    'smaller than its spread is no difference.',
    '',
    '## Every optimizer, every noise level',
    '',
    '| noise | optimizer | seeds | final test | peak test | selected test | noisy-label train '
    'acc. | ECE | top eigenvalue | grad. evals | s/run |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for noise, block in table.items():
    for label, row in block['rows'].items():
      out.append(
        f'| {noise} | {label} | {row["n"]} | {_value(row["final_test_accuracy"])} | '
        f'{_value(row["peak_test_accuracy"])} | {_value(row["selected_test_accuracy"])} | '
        f'{_value(row["noisy_train_accuracy"])} | {_value(row["ece"], digits=1)} | '
        f'{_value(row["top_eigenvalue"], 1.0, 2)} | {row["gradient_evaluations"]} | '
        f'{row["seconds"]["mean"]:.1f} |'
      )
  for against, title in (('vs_sgd', 'SGD'), ('vs_sam', 'SAM')):
    out += [
      '',
      f'## Paired differences against {title} (percentage points)',
      '',
    ]
    if against == 'vs_sam':
      out += [
        f'Against the reference SAM of each noise level (whole batch, rho={REFERENCE_RHO:g} '
        'when it ran). "share of SAM\'s gain" is (X - SGD) / (SAM - SGD) in final test accuracy, '
        'the mean paired difference of X over the mean paired gain of SAM, ± the spread of '
        "X's paired difference over the same gain.",
        '',
      ]
    head = '| noise | optimizer | final test | k/n | verdict | peak test | selected test | '
    head += 'noisy-label train acc. | ECE |'
    sep = '|---|---|---|---|---|---|---|---|---|'
    if against == 'vs_sam':
      head += " share of SAM's gain |"
      sep += '---|'
    out += [head, sep]
    for noise, block in table.items():
      for label, row in block['rows'].items():
        if against not in row or (against == 'vs_sam' and label == 'sgd'):
          continue  # SGD against SAM is the SAM row of the table against SGD, negated
        d = row[against]
        final = d['final_test_accuracy']
        line = (
          f'| {noise} | {label} | {_pm(final)} | {final["wins"]}/{final["n"]} | '
          f'{final["verdict"]} | {_pm(d["peak_test_accuracy"])} | '
          f'{_pm(d["selected_test_accuracy"])} | {_pm(d["noisy_train_accuracy"])} | '
          f'{_pm(d["ece"])} |'
        )
        if against == 'vs_sam':
          share = row.get('share_of_sam_gain')
          line += f' {share["mean"]:.2f} ± {share["std"]:.2f} |' if share else ' - |'
        out.append(line)
  return '\n'.join(out) + '\n'


def render_plots(document: dict, out: pathlib.Path) -> list:
  """``noise.png`` (final test accuracy against label noise, error bars: std over seeds) and
  ``epochs.png`` (test and noisy-label train accuracy over epochs at 40% noise, SGD and each
  whole-batch SAM; a dot marks the peak of each test curve)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  runs = document['runs']
  written = []
  fig, ax = plt.subplots(figsize=(7, 4.5))
  labels = _labels(runs)
  colors = plt.get_cmap('tab20').colors  # one colour per optimizer (the default cycle has 10)
  markers = 'osD^v<>ph*'
  for i, label in enumerate(labels):
    noises = sorted({r['noise'] for r in runs if r['label'] == label})
    shift = 0.4 * (i - (len(labels) - 1) / 2)  # side by side, so the error bars do not overlap
    stats = [
      mean_std([r['final_test_accuracy'] for r in runs if r['label'] == label and r['noise'] == n])
      for n in noises
    ]
    ax.errorbar(
      [100 * n + shift for n in noises],
      [100 * s['mean'] for s in stats],
      yerr=[100 * s['std'] for s in stats],
      marker=markers[i % len(markers)],
      color=colors[i % len(colors)],
      capsize=3,
      label=label,
      linestyle='-' if len(noises) > 1 else 'none',
    )
  ax.set_xlabel('label noise (%)')
  ax.set_ylabel('final test accuracy (%)')
  ax.set_title('MNIST-1D, final test accuracy (mean ± std over seeds; points spread apart)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(out / 'noise.png', dpi=120)
  plt.close(fig)
  written.append(out / 'noise.png')

  noise_levels = sorted({r['noise'] for r in runs})
  noise = MAIN_NOISE if MAIN_NOISE in noise_levels else noise_levels[-1]
  sams = [lab for lab in _labels(runs, noise) if lab.startswith('sam rho=') and 'm=' not in lab]
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, label in enumerate(['sgd', *sams]):
    color = f'C{i}'
    mine = [r for r in runs if r['label'] == label and r['noise'] == noise]
    if not mine:
      continue
    for metric, style, what in (
      ('test_accuracy', '-', 'test'),
      ('noisy_train_accuracy', ':', 'train, wrong labels'),
    ):
      curve = 100 * np.mean([r['curves'][metric] for r in mine], axis=0)
      epochs = np.arange(1, len(curve) + 1)
      ax.plot(epochs, curve, style, color=color, label=f'{label}: {what} ({len(mine)} seeds)')
      if metric == 'test_accuracy':
        peak = int(np.argmax(curve))
        ax.plot(epochs[peak], curve[peak], 'o', color=color)
  ax.set_xlabel('epoch')
  ax.set_ylabel('accuracy (%)')
  ax.set_title(f'{100 * noise:g}% label noise: test accuracy and memorized wrong labels')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / 'epochs.png', dpi=120)
  plt.close(fig)
  written.append(out / 'epochs.png')
  return written


def report(out: pathlib.Path) -> str:
  """Renders ``label_noise.md`` and the plots from ``label_noise.json``; returns the markdown."""
  document = json.loads((out / 'label_noise.json').read_text())
  for run in document['runs']:
    if not run['noise']:
      run['noisy_train_accuracy'] = None  # no label is wrong: nothing was memorized
  document['summary'] = summarize(document['runs'])
  markdown = render_markdown(document)
  (out / 'label_noise.md').write_text(markdown)
  render_plots(document, out)
  save(out / 'label_noise.json', document)
  return markdown


# --- Command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  """The command line."""
  default = Setting()
  p = argparse.ArgumentParser(
    prog='python -m benchmarks.label_noise', description=__doc__.split('\n')[0]
  )
  p.add_argument('--smoke', action='store_true', help='a tiny run that checks the script')
  p.add_argument('--seeds', type=int, help=f'seeds 0..N-1 (default {len(default.seeds)})')
  p.add_argument('--noise', help='comma-separated label-noise fractions (default 0,0.2,0.4,0.6)')
  p.add_argument(
    '--optimizers', help=f'comma-separated name[:rho[:m]] (default {",".join(default.optimizers)})'
  )
  p.add_argument(
    '--variants',
    help=f'comma-separated name[:rho[:m]] trained at noise {MAIN_NOISE:g} only (default '
    f'{",".join(default.variants)}; "none" for none)',
  )
  p.add_argument('--epochs', type=int, help=f'default {default.epochs}')
  p.add_argument('--width', type=int, help=f'default {default.width}')
  p.add_argument('--lr', type=float, help=f'default {default.lr}')
  p.add_argument('--weight-decay', type=float, help=f'default {default.weight_decay}')
  p.add_argument('--out', type=pathlib.Path, default=RESULTS, help=f'default {RESULTS}')
  p.add_argument('--resume', action='store_true', help='skip the runs already in the JSON')
  p.add_argument('--report', action='store_true', help='only render tables and plots from the JSON')
  return p


def setting_from(args: argparse.Namespace) -> Setting:
  """The setting the flags ask for."""
  setting = smoke_setting() if args.smoke else Setting()
  changes: dict[str, Any] = {}
  if args.seeds is not None:
    changes['seeds'] = tuple(range(args.seeds))
  if args.noise:
    changes['noise'] = tuple(float(x) for x in args.noise.split(','))
  if args.optimizers:
    changes['optimizers'] = tuple(x.strip() for x in args.optimizers.split(',') if x.strip())
  if args.variants:
    text = '' if args.variants.strip() == 'none' else args.variants
    changes['variants'] = tuple(x.strip() for x in text.split(',') if x.strip())
  for name in ('epochs', 'width', 'lr', 'weight_decay'):
    if getattr(args, name) is not None:
      changes[name] = getattr(args, name)
  setting = dataclasses.replace(setting, **changes)
  for spec in setting.optimizers + setting.variants:
    parse_spec(spec)
  for noise in setting.noise:
    if not 0.0 <= noise < 0.9:
      raise ValueError(f'label noise must be in [0, 0.9), got {noise}')
  return setting


SHARED = ('epochs', 'width', 'lr', 'momentum', 'weight_decay', 'batch_size', 'validation')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the benchmark (or only its report); returns the exit status."""
  args = build_parser().parse_args(argv)
  out = args.out
  path = out / 'label_noise.json'
  if args.report:
    if not path.exists():
      print(f'no {path} to report on', file=sys.stderr)
      return 1
    print(report(out))
    return 0
  try:
    setting = setting_from(args)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  document = dict(setting=setting.to_dict(), info={}, runs=[])
  if args.resume and path.exists():
    previous = json.loads(path.read_text())
    mismatch = [k for k in SHARED if previous['setting'].get(k) != setting.to_dict()[k]]
    if mismatch:
      print(f'error: --resume with a different {", ".join(mismatch)} than {path}', file=sys.stderr)
      return 2
    document['runs'] = previous['runs']
    document['info'] = previous.get('info', {})
    merged = dict(previous['setting'])
    for key in ('seeds', 'noise', 'optimizers', 'variants'):
      merged[key] = list(dict.fromkeys(list(merged.get(key, [])) + list(setting.to_dict()[key])))
    document['setting'] = merged
  done = {run_key(r) for r in document['runs']}
  data = load_data(setting.validation)
  began = time.perf_counter()
  info = document['info']
  info.update(
    jax=jax.__version__,
    backend=jax.default_backend(),
    devices=jax.device_count(),
    cpu_count=os.cpu_count(),
  )
  groups = [(parse_spec(o), n) for n in setting.noise for o in setting.optimizers]
  if MAIN_NOISE in setting.noise:
    groups += [(parse_spec(o), MAIN_NOISE) for o in setting.variants]
  for i, (spec, noise) in enumerate(groups):
    seeds = [s for s in setting.seeds if (spec.name, spec.rho, spec.m, noise, s) not in done]
    if not seeds:
      continue
    group_began = time.perf_counter()
    runs = run_group(spec, noise, seeds, setting, data)
    document['runs'].extend(runs)
    info['seconds'] = info.get('seconds', 0.0) + time.perf_counter() - group_began
    save(path, document)
    final = mean_std([r['final_test_accuracy'] for r in runs])
    memorized = mean_std([r['noisy_train_accuracy'] for r in runs])
    print(
      f'[{time.perf_counter() - began:7.1f}s] group {i + 1}/{len(groups)}: {spec.label:22s} '
      f'noise {noise:.1f}, seeds {seeds}: final test {_value(final)}, wrong labels fitted '
      f'{_value(memorized)} ({time.perf_counter() - group_began:.1f}s)',
      flush=True,
    )
  print(report(out))
  return 0


if __name__ == '__main__':
  sys.exit(main())
