"""The example's training: the model, the optimizer, the steps and the loop.

A library, like ``train.py`` in Flax's own examples: :func:`train_and_evaluate`
trains one run of a :class:`~optax_sam.examples.config.Config` and returns its
metrics; the command line (``python -m optax_sam.examples.main``, or
``python -m optax_sam.examples.train`` as before) is in
:mod:`~optax_sam.examples.main`, the Orbax checkpoints in
:mod:`~optax_sam.examples.checkpoints`.

The default run trains the :class:`~optax_sam.examples.models.ResNet` on
MNIST-1D with SAM (``rho = 0.05``, SGD with momentum, cosine learning rate).
Each run writes ``metrics.json``, ``curves.png`` and Orbax checkpoints to its
work folder; a resumed run continues from the last checkpoint and reaches the
same result as an uninterrupted run. With a
:class:`~optax_sam.examples.multiprocess.DataParallel` mesh every batch is
split over the devices of all processes.

The SAM step is the one ``optax_sam.flax`` is made for::

  (loss, logits), grads, grad_fn = optax_sam.flax.nnx_value_and_grad(
      loss_fn, model, x, y, has_aux=True)
  optimizer.update(model, grads, grad_fn=grad_fn)
"""

import dataclasses
import functools
import importlib
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_sam
import optax_sam.flax
from optax_sam import sharpness
from optax_sam._src import aliases
from optax_sam.examples import calibration, models, multiprocess, reporting
from optax_sam.examples import checkpoints as checkpoints_lib
from optax_sam.examples import config as config_lib
from optax_sam.examples import data as data_lib

# Sharpness is measured on the first SHARPNESS_EXAMPLES training examples, in eval
# mode, with SAM's normalized ascent at SHARPNESS_RHO whatever the optimizer.
SHARPNESS_EXAMPLES = 512
SHARPNESS_RHO = 0.05
# Unrolled: XLA's CPU backend runs convolutions inside loop bodies many times slower.
SHARPNESS_LANCZOS_STEPS = 10
LogFn = Callable[[str], None]


# ----------------------------------------------------------------------------- model and steps


def create_model(config: config_lib.Config, dataset: data_lib.Dataset) -> models.ResNet:
  """The ResNet for ``dataset``, initialized from ``config.seed``."""
  width = config.width
  return models.ResNet(
    dataset.num_classes,
    in_channels=dataset.channels,
    ndim=dataset.spatial_ndim,
    widths=(width, 2 * width, 4 * width),
    dropout=config.dropout,
    rngs=nnx.Rngs(config.seed),
  )


def create_optimizer(
  config: config_lib.Config, steps_per_epoch: int
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum, weight decay on the kernels and the schedule, wrapped in the chosen SAM.

  Args:
    config: the run's options (``optimizer``, ``rho``, ``lr``...).
    steps_per_epoch: optimizer steps per epoch, for the cosine schedule.

  Returns:
    The optimizer; for ``sgd`` the base optimizer, which ignores ``grad_fn``.
    SAM variants keep their step statistics (:func:`optax_sam.step_statistics`).

  Example:
    >>> from optax_sam.examples import config, train
    >>> tx = train.create_optimizer(config.Config(optimizer='fsam+stable'), steps_per_epoch=10)
    >>> callable(tx.update)
    True
  """
  # lookbehind's base optimizer takes k inner steps per training step: its schedule spans them.
  inner = (
    config_lib.library_default(optax_sam.lookbehind_sam, 'k')
    if config.spec.named == 'lookbehind'
    else 1
  )
  if config.lr_schedule == 'cosine':
    lr = optax.cosine_decay_schedule(config.lr, decay_steps=inner * config.epochs * steps_per_epoch)
  else:
    lr = config.lr
  kernels = lambda params: jax.tree.map(lambda w: w.ndim > 1, params)
  base = optax.chain(
    optax.add_decayed_weights(config.weight_decay, mask=kernels),
    optax.sgd(lr, momentum=config.momentum or None),
  )
  spec, rho = config.spec, config.resolved_rho
  if not spec.sam:
    return optax.with_extra_args_support(base)
  if spec.momentum:
    return optax_sam.momentum_sam(base, rho)
  if spec.look:
    return optax_sam.look_sam(
      base, rho, alpha=config.look_alpha, k=config.sam_every or 5, statistics=True
    )
  when = None
  if config.sam_every is not None:
    when = optax_sam.every(config.sam_every)
  elif config.sam_after is not None:
    when = optax_sam.after(int(round(config.sam_after * config.epochs * steps_per_epoch)))
  if spec.gsam:
    return optax_sam.gsam(base, rho, alpha=config.alpha, when=when, statistics=True)
  if spec.named == 'lookbehind':  # k inner steps per step: no statistics, no when=
    return optax_sam.lookbehind_sam(base, rho)
  if spec.named == 'sampa':  # both gradients in one update, every step: no statistics, no when=
    return optax_sam.sampa(base, rho)
  if spec.named == 'bsam':  # its own optimizer, on the examples of an epoch: no SGD base
    data_size = steps_per_epoch * config.batch_size
    return config_lib.bsam_for_sgd(lr, rho, config.momentum, config.weight_decay, data_size)
  if spec.named:  # WSAM's decoupled term takes the base's learning rate
    extra = {'learning_rate': lr} if spec.named == 'wsam' else {}
    return aliases.VARIANTS[spec.named](base, rho, when=when, statistics=True, **extra)
  adaptive = dict(
    adaptive=spec.adaptive,
    eta=config.resolved_eta if spec.adaptive else 0.0,
    adaptive_mask=optax_sam.not_bias_mask if spec.adaptive else None,
  )
  options = dict(
    normalize=spec.normalize, stable=spec.stable, when=when, statistics=True, **adaptive
  )
  if spec.friendly:
    return optax_sam.friendly_sam(base, rho, sigma=config.sigma, lmbda=config.lmbda, **options)
  return optax_sam.sam(base, rho, **options)


@functools.lru_cache(maxsize=32)
def _shared_optimizer(config: config_lib.Config, steps_per_epoch: int):
  """:func:`create_optimizer`, one object per distinct optimizer setting.

  ``nnx.jit`` compiles ``train_step`` once per optimizer object (it is part of
  the optimizer's static structure): sharing the object between runs of one
  process (``--compare`` with the same optimizer, tests, notebooks) reuses the
  compiled step.
  """
  return create_optimizer(config, steps_per_epoch)


def _optimizer_key(config: config_lib.Config) -> config_lib.Config:
  """``config`` with the fields the optimizer does not depend on set to their defaults."""
  defaults = config_lib.Config()
  keep = {'optimizer', 'rho', 'lr', 'momentum', 'weight_decay', 'sigma', 'lmbda', 'alpha', 'eta'}
  keep |= {'look_alpha', 'sam_every', 'sam_after'}
  keep |= {'lr_schedule'} | ({'epochs'} if _needs_run_length(config) else set())
  keep |= {'batch_size'} if config.spec.named == 'bsam' else set()  # its data_size
  return dataclasses.replace(
    defaults,
    **{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in keep},
  )


def _needs_run_length(config: config_lib.Config) -> bool:
  """Whether the optimizer depends on the run's length (cosine schedule, ``--sam-after``) or on
  the epoch's examples (bSAM's ``data_size``)."""
  return (
    config.lr_schedule == 'cosine' or config.sam_after is not None or config.spec.named == 'bsam'
  )


def _holds_perturbed_weights(optimizer: nnx.Optimizer) -> bool:
  """Whether the optimizer is Momentum-SAM, whose model holds ``w - rho v / ||v||``."""
  is_msam = lambda x: isinstance(x, optax_sam.MomentumSAMState)
  return any(map(is_msam, jax.tree.leaves(nnx.as_pure(optimizer.opt_state), is_leaf=is_msam)))


def clean_model(model: models.ResNet, optimizer: nnx.Optimizer) -> models.ResNet:
  """``model`` at the clean weights :func:`optax_sam.clean_params` gives (Momentum-SAM's ``w``).

  For the other optimizers of the example the model already holds them and is returned as is.
  """
  if not _holds_perturbed_weights(optimizer):
    return model
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  clean = optax_sam.clean_params(params, nnx.as_pure(optimizer.opt_state))
  copy = nnx.clone(model)  # a new module: updating it leaves the training model alone
  nnx.update(copy, clean)
  return copy


def loss_fn(model: models.ResNet, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy, and the logits."""
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def _step_statistics(optimizer: nnx.Optimizer) -> dict[str, jax.Array]:
  """The SAM step's statistics as a dict (empty for plain SGD, which keeps none)."""
  try:
    stats = optax_sam.step_statistics(nnx.as_pure(optimizer.opt_state))
  except ValueError:
    return {}
  nonzero = stats.grad_norm > 0
  ratio = jnp.where(nonzero, stats.adv_grad_norm / jnp.where(nonzero, stats.grad_norm, 1), 0)
  return stats._asdict() | {'norm_ratio': ratio}


@nnx.jit
def train_step(
  model: models.ResNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """One SAM step; returns the clean pass's loss, the correct predictions and the statistics."""
  (loss, logits), grads, grad_fn = optax_sam.flax.nnx_value_and_grad(
    loss_fn, model, x, y, has_aux=True
  )
  optimizer.update(model, grads, grad_fn=grad_fn)
  return loss, jnp.sum(jnp.argmax(logits, -1) == y), _step_statistics(optimizer)


def _group_loss(model: models.ResNet) -> Callable[[Any, tuple], jax.Array]:
  """``loss(params, (x, y, group))`` on a copy of ``model`` rebuilt from the state it holds now.

  Call it before the step's own forward pass: every group then starts from the
  same state and leaves the model alone. Each group draws its own dropout masks
  (its index, ``group[0]``, is folded into every RNG key); a group's train-mode
  BatchNorm normalizes with the group's statistics.
  """
  graphdef, keys, rest = nnx.split(model, nnx.RngKey, ...)
  keys, rest = nnx.as_pure(keys), nnx.as_pure(rest)

  def loss(params, batch):
    x, y, group = batch
    copy = nnx.merge(graphdef, jax.tree.map(lambda k: jax.random.fold_in(k, group[0]), keys), rest)
    nnx.update(copy, params)
    return loss_fn(copy, x, y)[0]

  return loss


def _unused_grads(model: models.ResNet) -> Any:
  """Zeros like the parameters: the gradient argument of a step that takes its gradients itself."""
  return jax.tree.map(jnp.zeros_like, nnx.as_pure(nnx.state(model, nnx.Param)))


def _as_grads(model: models.ResNet, grads: Any) -> nnx.State:
  """A pure gradient tree as the ``nnx.State`` of ``nnx.Param`` that ``optimizer.update`` takes."""
  variables = nnx.state(model, nnx.Param)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda v, g: v.replace(g), variables, grads, is_leaf=is_variable)


@functools.partial(nnx.jit, static_argnames=('size', 'accumulate', 'route'))
def micro_batch_train_step(
  model: models.ResNet,
  optimizer: nnx.Optimizer,
  x: jax.Array,
  y: jax.Array,
  size: int,
  accumulate: bool,
  route: str = 'scan',
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """One SAM step over micro-batches of ``size`` examples; returns what :func:`train_step` does.

  With ``accumulate`` both gradients are averaged over the micro-batches and the
  whole batch is perturbed once (:func:`optax_sam.accumulated_grad_fn`);
  otherwise each micro-batch is perturbed with its own gradient, m-sharpness
  with ``m = size`` (:func:`optax_sam.micro_batches`, by ``route``). The loss,
  the accuracy and the BatchNorm running statistics come from one more
  forward pass over the whole batch, without a gradient.
  """
  grad = jax.grad(_group_loss(model))
  batch = (x, y, jnp.arange(x.shape[0]) // size)
  loss, logits = loss_fn(model, x, y)
  if accumulate:
    grad_fn = optax_sam.accumulated_grad_fn(grad, batch, size)
    grads = grad_fn(nnx.as_pure(nnx.state(model, nnx.Param)))
  else:  # the step takes each group's clean gradient itself: the gradient argument is unused
    grad_fn = optax_sam.micro_batches(grad, batch, size, route=route)
    grads = _unused_grads(model)
  optimizer.update(model, _as_grads(model, grads), grad_fn=grad_fn)
  return loss, jnp.sum(jnp.argmax(logits, -1) == y), _step_statistics(optimizer)


@nnx.jit
def sampa_train_step(
  model: models.ResNet,
  optimizer: nnx.Optimizer,
  x: jax.Array,
  y: jax.Array,
  previous_x: jax.Array,
  previous_y: jax.Array,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """One SAMPa step: the perturbed point's gradient on the previous batch, as the official code.

  :func:`optax_sam.sampa` takes both gradients (one ``vmap`` over the two points, each with its
  own batch: :func:`optax_sam.batch_pair`); the loss, the accuracy and the BatchNorm running
  statistics come from a forward pass over the batch, without a gradient.
  """
  grad = jax.grad(_group_loss(model))
  group = jnp.zeros(x.shape[0], jnp.int32)  # dropout keys: one fold for each of the two points
  pair = optax_sam.batch_pair(grad, (previous_x, previous_y, group), (x, y, group + 1))
  loss, logits = loss_fn(model, x, y)
  optimizer.update(model, _as_grads(model, _unused_grads(model)), grad_fn=pair)
  return loss, jnp.sum(jnp.argmax(logits, -1) == y), {}


def _sampa_steps() -> Callable[..., Any]:
  """:func:`sampa_train_step` with the previous batch remembered (the first: the batch itself)."""
  previous = []

  def step(model, optimizer, x, y):
    px, py = previous.pop() if previous else (x, y)
    previous.append((x, y))
    return sampa_train_step(model, optimizer, x, y, px, py)

  return step


def _train_step(config: config_lib.Config) -> Callable[..., Any]:
  """The step ``config`` asks for: :func:`train_step`, a :func:`micro_batch_train_step` or SAMPa's.

  SAMPa's pairs each batch with the one before it within an epoch (the first step of an epoch
  pairs its batch with itself).
  """
  if config.spec.named == 'sampa':
    return _sampa_steps()
  if config.spec.named == 'bsam' and config.m_sharpness is None:  # one group: the whole batch
    return functools.partial(micro_batch_train_step, size=config.batch_size, accumulate=False)
  if config.m_sharpness is not None:
    return functools.partial(
      micro_batch_train_step, size=config.m_sharpness, accumulate=False, route=config.group_route
    )
  if config.accumulate is not None:
    size = config.batch_size // config.accumulate
    return functools.partial(micro_batch_train_step, size=size, accumulate=True)
  return train_step


@functools.partial(nnx.jit, static_argnames='num_steps')
def measure_sharpness(
  model: models.ResNet, x: jax.Array, y: jax.Array, key: jax.Array, num_steps: int
) -> dict[str, jax.Array]:
  """The top Hessian eigenvalue (and its residual) and the SAM sharpness on ``(x, y)``, eval mode.

  Eval mode (running BatchNorm statistics, no dropout) measures the function the
  model computes at test time, and does not depend on how the batch is split.
  """
  batch_loss = lambda m, batch: loss_fn(m, *batch)[0]
  loss_of_params, params = optax_sam.flax.nnx_loss_fn(batch_loss, model, train=False)
  top = sharpness.hessian_eigenvalues(
    loss_of_params, params, (x, y), key=key, k=1, num_steps=num_steps
  )
  sam = sharpness.sam_sharpness(loss_of_params, params, (x, y), rho=SHARPNESS_RHO)
  return {
    'hessian_top_eigenvalue': top.eigenvalues[0],
    'hessian_residual': top.residuals[0],
    'sam_sharpness': sam.sharpness,
  }


@nnx.jit
def eval_step(
  model: models.ResNet, x: jax.Array, y: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Summed loss and number of correct predictions over the examples ``mask`` keeps."""
  logits = model(x)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(losses * mask), jnp.sum((jnp.argmax(logits, -1) == y) * mask)


def evaluate(
  model: models.ResNet,
  x: np.ndarray,
  y: np.ndarray,
  parallel: Optional[multiprocess.DataParallel] = None,
) -> tuple[float, float]:
  """Loss and accuracy of ``model`` in inference mode (running statistics, no dropout).

  With ``parallel`` each eval batch is split over the mesh (padded to a multiple of its
  devices); the sums are global, so every process gets the same numbers.
  """
  eval_model = nnx.view(model, deterministic=True, use_running_average=True)
  size, place = data_lib.EVAL_BATCH_SIZE, lambda *batch: batch
  if parallel is not None:
    size, place = parallel.padded_size(data_lib.EVAL_BATCH_SIZE), parallel.batch
  totals = [eval_step(eval_model, *place(*batch)) for batch in data_lib.eval_batches(x, y, size)]
  loss, correct = np.sum(np.asarray(totals), axis=0)
  return float(loss) / len(y), float(correct) / len(y)


# ----------------------------------------------------------------------------- the loop


def _checkpointed(model: models.ResNet, optimizer: nnx.Optimizer) -> dict:
  """What a checkpoint of this run holds (:func:`~optax_sam.examples.checkpoints.training_state`):
  the model at the clean weights, the optimizer state, and for Momentum-SAM the perturbed weights
  it holds (``held``), from which training continues."""
  return checkpoints_lib.training_state(model, optimizer, clean_model(model, optimizer))


def _create_training(
  config: config_lib.Config,
  dataset: data_lib.Dataset,
  parallel: Optional[multiprocess.DataParallel],
) -> tuple[models.ResNet, nnx.Optimizer]:
  """The model and its optimizer, on every device of ``parallel``'s mesh if given."""
  steps_per_epoch = len(dataset.y_train) // config.batch_size
  model = create_model(config, dataset)
  schedule_steps = steps_per_epoch if _needs_run_length(config) else 1
  tx = _shared_optimizer(_optimizer_key(config), schedule_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if parallel is not None:  # what the steps carry, on every device of the mesh
    nnx.update(model, parallel.replicate(nnx.state(model)))
    nnx.update(optimizer, parallel.replicate(nnx.state(optimizer)))
  return model, optimizer


def _sharpness_probe(
  config: config_lib.Config,
  dataset: data_lib.Dataset,
  parallel: Optional[multiprocess.DataParallel],
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """The fixed batch and the Lanczos key :func:`measure_sharpness` uses every time."""
  batch = (
    jnp.asarray(dataset.x_train[:SHARPNESS_EXAMPLES]),
    jnp.asarray(dataset.y_train[:SHARPNESS_EXAMPLES]),
  )
  key = jax.random.key(config.seed)
  if parallel is not None:
    batch, key = parallel.replicate((batch, key))
  return batch, key


def _train_epoch(
  config: config_lib.Config,
  dataset: data_lib.Dataset,
  model: models.ResNet,
  optimizer: nnx.Optimizer,
  epoch: int,
  progress: bool,
  parallel: Optional[multiprocess.DataParallel],
) -> tuple[float, float, list[dict[str, jax.Array]]]:
  """One epoch of steps; returns the mean loss, the accuracy and each step's statistics."""
  from tqdm import tqdm

  step_fn = _train_step(config)
  steps_per_epoch = len(dataset.y_train) // config.batch_size
  batches = data_lib.train_batches(
    dataset.x_train, dataset.y_train, config.batch_size, config.seed, epoch
  )
  bar = tqdm(
    batches,
    total=steps_per_epoch,
    desc=f'epoch {epoch + 1}/{config.epochs}',
    unit='step',
    leave=False,
    disable=None if progress else True,  # None: only on a terminal
  )
  losses, corrects, statistics = [], [], []
  for step, (x, y) in enumerate(bar):
    if parallel is not None:  # this process's rows of the global batch
      x, y = parallel.batch(x, y)
    loss, correct, stats = step_fn(model, optimizer, x, y)
    losses.append(loss)
    corrects.append(correct)
    statistics.append(stats)
    if progress and step % 10 == 0:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  bar.close()
  train_loss = float(jnp.mean(jnp.stack(losses)))
  train_accuracy = float(jnp.sum(jnp.stack(corrects))) / (steps_per_epoch * config.batch_size)
  return train_loss, train_accuracy, statistics


def _epoch_record(
  config: config_lib.Config,
  dataset: data_lib.Dataset,
  model: models.ResNet,
  optimizer: nnx.Optimizer,
  epoch: int,
  began: float,
  trained: tuple[float, float, list[dict[str, jax.Array]]],
  probe: tuple[tuple[jax.Array, jax.Array], jax.Array],
  parallel: Optional[multiprocess.DataParallel],
) -> dict:
  """The epoch's line of the history: ``trained`` (:func:`_train_epoch`'s), the test metrics at
  the clean weights, the mean step statistics and, on the epochs that measure it, the sharpness."""
  train_loss, train_accuracy, statistics = trained
  clean = clean_model(model, optimizer)
  test_loss, test_accuracy = evaluate(clean, dataset.x_test, dataset.y_test, parallel)
  record = dict(
    epoch=epoch + 1,
    train_loss=train_loss,
    train_accuracy=train_accuracy,
    test_loss=test_loss,
    test_accuracy=test_accuracy,
    seconds=time.perf_counter() - began,
  )
  if statistics[0]:  # the epoch's mean of each SAM step statistic
    record['step_statistics'] = {
      name: float(jnp.mean(jnp.stack([s[name] for s in statistics]))) for name in statistics[0]
    }
  every = config.sharpness_every
  if every and ((epoch + 1) % every == 0 or epoch + 1 == config.epochs):
    batch, key = probe
    measured = measure_sharpness(clean, *batch, key, SHARPNESS_LANCZOS_STEPS)
    record['sharpness'] = {name: float(v) for name, v in measured.items()}
  return record


def _epoch_line(config: config_lib.Config, record: dict) -> str:
  """The line logged after each epoch."""
  measured = ''
  if 'sharpness' in record:
    measured = (
      f'  top eigenvalue {record["sharpness"]["hessian_top_eigenvalue"]:.3f}'
      f'  sam sharpness {record["sharpness"]["sam_sharpness"]:.4f}'
    )
  return (
    f'epoch {record["epoch"]:>3}/{config.epochs}  train loss {record["train_loss"]:.4f}  '
    f'train acc {record["train_accuracy"]:.4f}  test loss {record["test_loss"]:.4f}  '
    f'test acc {record["test_accuracy"]:.4f}  ({record["seconds"]:.1f} s){measured}'
  )


def _write_plots(workdir: pathlib.Path, history: list[dict], title: str, log: LogFn) -> None:
  """The training curves, and the sharpness plot with the panels the history has values for."""
  reporting.plot_curves(workdir / reporting.CURVES_FILE, history, title)
  (workdir / reporting.SHARPNESS_PLOT).unlink(missing_ok=True)
  if not reporting.plot_sharpness(workdir / reporting.SHARPNESS_PLOT, history, title):
    return
  if not any('sharpness' in h for h in history):
    log(
      f'{reporting.SHARPNESS_PLOT}: the SAM step statistics only; --sharpness-every N also '
      'measures the top Hessian eigenvalue and the SAM sharpness'
    )


def train_and_evaluate(
  config: config_lib.Config,
  workdir: pathlib.Path,
  *,
  dataset: Optional[data_lib.Dataset] = None,
  resume: bool = False,
  progress: bool = True,
  log: LogFn = print,
  parallel: Optional[multiprocess.DataParallel] = None,
) -> dict:
  """Trains and evaluates one run, writing metrics, the plot and checkpoints to ``workdir``.

  Args:
    config: a validated :class:`~optax_sam.examples.config.Config`.
    workdir: the output folder (created if needed).
    dataset: the data (default: loaded from ``config``).
    resume: continue from the checkpoint in ``workdir`` (up to ``config.epochs``).
    progress: show a tqdm progress bar per epoch.
    log: where the per-epoch lines go.
    parallel: split every batch over this mesh (every process of a
      ``jax.distributed`` job calls this function); only process 0 logs and
      writes the metrics and plots, and all save and restore the checkpoints.

  Returns:
    The metrics: ``config``, ``dataset``, ``history`` (one dict per epoch with
    ``epoch``, ``train_loss``, ``train_accuracy``, ``test_loss``,
    ``test_accuracy``, ``seconds``), ``final`` (the last epoch's metrics,
    ``best_test_accuracy`` and the total ``seconds``) and, on one process,
    ``calibration`` (:func:`~optax_sam.examples.calibration.calibrate`: the test
    ECE and NLL, and for ``bsam`` those of its posterior's model average).
  """
  if dataset is None:
    dataset = load_dataset(config)
  fingerprint = data_lib.fingerprint(dataset)
  model, optimizer = _create_training(config, dataset, parallel)
  writes = parallel is None or parallel.writes
  if not writes:
    log, progress = (lambda _: None), False
  start = checkpoints_lib.check_resumable(config, workdir, fingerprint) if resume else 0
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = checkpoints_lib.Checkpoints(workdir / checkpoints_lib.CHECKPOINT_DIR)
  history = []
  if resume:
    template = _checkpointed(model, optimizer)
    state, meta = checkpoints.restore(start, template, placed=parallel is not None)
    checkpoints_lib.load_training_state(model, optimizer, state)
    history = meta['history']
    log(f'resumed from epoch {start} in {workdir / checkpoints_lib.CHECKPOINT_DIR}')

  title = f'{config.optimizer} on {dataset.name} (rho={config.resolved_rho:g}, seed {config.seed})'
  probe = _sharpness_probe(config, dataset, parallel)
  metrics = {
    'config': config.to_dict() | {'rho': config.resolved_rho},
    'dataset': {
      'name': dataset.name,
      'train_examples': len(dataset.y_train),
      'test_examples': len(dataset.y_test),
    },
  }
  meta = {'config': checkpoints_lib.config_for_checkpoint(config), 'data': fingerprint}
  try:
    for epoch in range(start, config.epochs):
      began = time.perf_counter()
      trained = _train_epoch(config, dataset, model, optimizer, epoch, progress, parallel)
      record = _epoch_record(
        config, dataset, model, optimizer, epoch, began, trained, probe, parallel
      )
      history.append(record)
      log(_epoch_line(config, record))
      checkpoints.save(
        epoch + 1, _checkpointed(model, optimizer), {'epoch': epoch + 1, **meta, 'history': history}
      )
      metrics |= {'history': history, 'final': reporting.summary(history)}
      if writes:
        reporting.write_json(workdir / reporting.METRICS_FILE, metrics)
  finally:
    checkpoints.close()
  metrics |= {'history': history, 'final': reporting.summary(history)}
  if parallel is None:  # one process: the test set's calibration (bSAM: its model average too)
    metrics['calibration'] = calibration.calibrate(
      clean_model(model, optimizer),
      nnx.as_pure(optimizer.opt_state),
      dataset.x_test,
      dataset.y_test,
      config.resolved_predictive_samples,
      config.seed,
    )
    log(f'calibration: {calibration.describe(metrics["calibration"])}')
  if writes:
    reporting.write_json(workdir / reporting.METRICS_FILE, metrics)
    _write_plots(workdir, history, title, log)
  return metrics


def load_dataset(config: config_lib.Config) -> data_lib.Dataset:
  """The dataset ``config`` asks for, with its label noise."""
  return data_lib.load(
    config.dataset,
    data_dir=config.data_dir,
    num_samples=config.num_samples,
    label_noise=config.label_noise,
    seed=config.seed,
  )


# ----------------------------------------------------------------------------- moved names

# Names this module held before the command line moved to main.py and the checkpoints to
# checkpoints.py, still readable here (``train.main``, ``train.Checkpoints``...).
_MOVED = {name: 'main' for name in ('main', 'make_plan', 'run', 'Plan', 'build_parser')}
_MOVED |= {name: 'main' for name in ('check_writable',)}
_MOVED |= {name: 'checkpoints' for name in ('Checkpoints', 'CHECKPOINT_DIR', 'check_resumable')}
_MOVED |= {name: 'checkpoints' for name in ('_flat', '_unflat')}


def __getattr__(name: str) -> Any:
  if name in _MOVED:
    return getattr(importlib.import_module(f'optax_sam.examples.{_MOVED[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':  # python -m optax_sam.examples.train: the command of main.py
  main_lib = importlib.import_module('optax_sam.examples.main')
  sys.exit(main_lib.main(prog='python -m optax_sam.examples.train'))
