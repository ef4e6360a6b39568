"""Trains a small residual CNN with a SAM-family optimizer: ``python -m optax_sam.examples.train``.

The default run trains the :class:`~optax_sam.examples.models.ResNet` on
MNIST-1D with SAM (``rho = 0.05``, SGD with momentum, cosine learning rate)
and prints the final test accuracy as its last line. ``--optimizer``,
``--dataset`` and the hyperparameter flags change the run (``--help`` lists
them); ``--compare sgd,sam,fsam`` trains several optimizers with the same seed
and prints a table. Each run writes ``metrics.json``, ``curves.png`` and Orbax
checkpoints to ``--workdir``; ``--resume`` continues from the last checkpoint
and reaches the same result as an uninterrupted run. ``--coordinator``,
``--num-processes`` and ``--process-id`` (or ``--cluster``) run it on several
processes, data-parallel over all their devices
(:mod:`~optax_sam.examples.multiprocess`).

The SAM step is the one ``optax_sam.flax`` is made for::

  (loss, logits), grads, grad_fn = optax_sam.flax.nnx_value_and_grad(
      loss_fn, model, x, y, has_aux=True)
  optimizer.update(model, grads, grad_fn=grad_fn)
"""

import argparse
import dataclasses
import functools
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_sam
import optax_sam.flax
from optax_sam import sharpness
from optax_sam.examples import config as config_lib
from optax_sam.examples import data as data_lib
from optax_sam.examples import models, multiprocess, reporting

EVAL_BATCH_SIZE = 500
# Sharpness is measured on the first SHARPNESS_EXAMPLES training examples, in eval
# mode, with SAM's normalized ascent at SHARPNESS_RHO whatever the optimizer.
SHARPNESS_EXAMPLES = 512
SHARPNESS_RHO = 0.05
# Unrolled: XLA's CPU backend runs convolutions inside loop bodies many times slower.
SHARPNESS_LANCZOS_STEPS = 10
CHECKPOINT_DIR = 'checkpoints'
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
  if config.lr_schedule == 'cosine':
    lr = optax.cosine_decay_schedule(config.lr, decay_steps=config.epochs * steps_per_epoch)
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
  return dataclasses.replace(
    defaults,
    **{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in keep},
  )


def _needs_run_length(config: config_lib.Config) -> bool:
  """Whether the optimizer depends on the run's length (cosine schedule, ``--sam-after``)."""
  return config.lr_schedule == 'cosine' or config.sam_after is not None


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
    grads = jax.tree.map(jnp.zeros_like, nnx.as_pure(nnx.state(model, nnx.Param)))
  optimizer.update(model, _as_grads(model, grads), grad_fn=grad_fn)
  return loss, jnp.sum(jnp.argmax(logits, -1) == y), _step_statistics(optimizer)


def _train_step(config: config_lib.Config) -> Callable[..., Any]:
  """The step ``config`` asks for: :func:`train_step` or a :func:`micro_batch_train_step`."""
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
  size, place = EVAL_BATCH_SIZE, lambda *batch: batch
  if parallel is not None:
    size, place = parallel.padded_size(EVAL_BATCH_SIZE), parallel.batch
  totals = [eval_step(eval_model, *place(*batch)) for batch in data_lib.eval_batches(x, y, size)]
  loss, correct = np.sum(np.asarray(totals), axis=0)
  return float(loss) / len(y), float(correct) / len(y)


# ----------------------------------------------------------------------------- checkpoints


def _is_key(leaf: Any) -> bool:
  return jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key)


def _flat(tree: Any) -> dict[str, Any]:
  """A flat ``{path: array}`` dict, RNG keys as their raw data (what Orbax can store)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.as_pure(tree))[0]:
    flat[jax.tree_util.keystr(path, simple=True, separator='/')] = (
      jax.random.key_data(leaf) if _is_key(leaf) else leaf
    )
  return flat


def _unflat(template: Any, flat: dict[str, Any]) -> Any:
  """Inverse of :func:`_flat`, with the structure and key types of ``template``."""
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(nnx.as_pure(template))
  leaves = []
  for path, like in leaves_with_paths:
    leaf = flat[jax.tree_util.keystr(path, simple=True, separator='/')]
    if _is_key(like):
      leaf = jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
    leaves.append(leaf)
  return jax.tree.unflatten(treedef, leaves)


class Checkpoints:
  """Orbax checkpoints of the model, the optimizer and the run's history, one per epoch.

  Args:
    directory: the checkpoint folder.
    create: create the folder if it does not exist.
  """

  def __init__(self, directory: pathlib.Path, create: bool = True):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=create, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

  def latest_epoch(self) -> Optional[int]:
    """The last saved epoch, or ``None``."""
    return self.manager.latest_step()

  def read_meta(self, epoch: int) -> dict:
    """The JSON part (epoch, config, history) of a checkpoint."""
    args = self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
    return self.manager.restore(epoch, args=args)['meta']

  def save(self, epoch: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (any tree of NNX states and arrays) and ``meta``."""
    args = self._ocp.args.Composite(
      state=self._ocp.args.StandardSave(_flat(state)), meta=self._ocp.args.JsonSave(meta)
    )
    self.manager.save(epoch, args=args)
    self.manager.wait_until_finished()

  def restore(self, epoch: int, template: Any, placed: bool = False) -> tuple[Any, dict]:
    """The state saved at ``epoch``, shaped like ``template``, and its meta.

    ``placed``: keep the arrays as Orbax restores them, with ``template``'s shardings
    (the multi-process run, whose arrays span the processes' devices).
    """
    abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, _flat(template))
    args = self._ocp.args.Composite(
      state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore()
    )
    restored = self.manager.restore(epoch, args=args)
    # Orbax returns arrays committed to a device, fresh ones are not: going through the host
    # makes them alike, so the compiled train step is reused instead of compiled again.
    flat = restored['state']
    if not placed:
      flat = {k: jnp.asarray(np.asarray(v)) for k, v in flat.items()}
    return _unflat(template, flat), restored['meta']

  def close(self) -> None:
    self.manager.close()


def _checkpointed(model: models.ResNet, optimizer: nnx.Optimizer) -> dict:
  """What a checkpoint holds: the model at the clean weights, the optimizer state, and for
  Momentum-SAM the perturbed weights it holds (``held``), from which training continues."""
  state = {'model': nnx.state(clean_model(model, optimizer)), 'optimizer': nnx.state(optimizer)}
  if _holds_perturbed_weights(optimizer):
    state['held'] = nnx.state(model, nnx.Param)
  return state


def _config_for_checkpoint(config: config_lib.Config) -> dict:
  fields = config.to_dict()
  for name in config_lib.RESUMABLE_CHANGES + ('data_dir',):
    fields.pop(name)
  return fields


def check_resumable(config: config_lib.Config, workdir: pathlib.Path, fingerprint: str) -> int:
  """Checks that ``workdir`` holds a checkpoint of this run; returns its epoch.

  Raises:
    ConfigError: no checkpoint, or one written with other options or data.
  """
  directory = workdir / CHECKPOINT_DIR
  epoch = None
  if directory.is_dir():
    checkpoints = Checkpoints(directory, create=False)
    epoch = checkpoints.latest_epoch()
    meta = checkpoints.read_meta(epoch) if epoch is not None else None
    checkpoints.close()
  if epoch is None:
    raise config_lib.ConfigError(
      f'--resume: no checkpoint in {directory}; run once without --resume to start'
    )
  saved, wanted = meta['config'], _config_for_checkpoint(config)
  changed = [f'--{k.replace("_", "-")} {saved.get(k)!r} -> {v!r}' for k, v in wanted.items()
             if saved.get(k) != v]  # fmt: skip
  if changed:
    raise config_lib.ConfigError(
      f'--resume: the checkpoint in {directory} was made with other options '
      f'({"; ".join(changed)}); only --epochs may change when resuming'
    )
  if epoch > config.epochs:
    raise config_lib.ConfigError(
      f'--resume: the checkpoint in {directory} is at epoch {epoch}, past --epochs '
      f'{config.epochs}; pass --epochs {epoch} or more'
    )
  if meta.get('data') != fingerprint:
    raise config_lib.ConfigError(
      f'--resume: the checkpoint in {directory} was trained on other data than {config.dataset}'
      ' loads now'
    )
  return epoch


# ----------------------------------------------------------------------------- training


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
    ``test_accuracy``, ``seconds``) and ``final`` (the last epoch's metrics,
    ``best_test_accuracy`` and the total ``seconds``).
  """
  from tqdm import tqdm

  if dataset is None:
    dataset = load_dataset(config)
  fingerprint = data_lib.fingerprint(dataset)
  steps_per_epoch = len(dataset.y_train) // config.batch_size
  model = create_model(config, dataset)
  schedule_steps = steps_per_epoch if _needs_run_length(config) else 1
  tx = _shared_optimizer(_optimizer_key(config), schedule_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  writes = parallel is None or parallel.writes
  if not writes:
    log, progress = (lambda _: None), False
  if parallel is not None:  # what the steps carry, on every device of the mesh
    nnx.update(model, parallel.replicate(nnx.state(model)))
    nnx.update(optimizer, parallel.replicate(nnx.state(optimizer)))

  start = check_resumable(config, workdir, fingerprint) if resume else 0
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = Checkpoints(workdir / CHECKPOINT_DIR)
  history = []
  step_fn = _train_step(config)
  if resume:
    template = _checkpointed(model, optimizer)
    state, meta = checkpoints.restore(start, template, placed=parallel is not None)
    nnx.update(model, state['model'])
    nnx.update(optimizer, state['optimizer'])
    if 'held' in state:  # Momentum-SAM: the weights training continues from
      nnx.update(model, state['held'])
    history = meta['history']
    log(f'resumed from epoch {start} in {workdir / CHECKPOINT_DIR}')

  title = f'{config.optimizer} on {dataset.name} (rho={config.resolved_rho:g}, seed {config.seed})'
  sharpness_batch = (
    jnp.asarray(dataset.x_train[:SHARPNESS_EXAMPLES]),
    jnp.asarray(dataset.y_train[:SHARPNESS_EXAMPLES]),
  )
  sharpness_key = jax.random.key(config.seed)
  if parallel is not None:
    sharpness_batch, sharpness_key = parallel.replicate((sharpness_batch, sharpness_key))
  metrics = {
    'config': config.to_dict() | {'rho': config.resolved_rho},
    'dataset': {
      'name': dataset.name,
      'train_examples': len(dataset.y_train),
      'test_examples': len(dataset.y_test),
    },
  }
  try:
    for epoch in range(start, config.epochs):
      began = time.perf_counter()
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
      test_loss, test_accuracy = evaluate(
        clean_model(model, optimizer), dataset.x_test, dataset.y_test, parallel
      )
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
        measured = measure_sharpness(
          clean_model(model, optimizer),
          *sharpness_batch,
          sharpness_key,
          SHARPNESS_LANCZOS_STEPS,
        )
        record['sharpness'] = {name: float(v) for name, v in measured.items()}
      history.append(record)
      measured = ''
      if 'sharpness' in record:
        measured = (
          f'  top eigenvalue {record["sharpness"]["hessian_top_eigenvalue"]:.3f}'
          f'  sam sharpness {record["sharpness"]["sam_sharpness"]:.4f}'
        )
      log(
        f'epoch {epoch + 1:>3}/{config.epochs}  train loss {train_loss:.4f}  '
        f'train acc {train_accuracy:.4f}  test loss {test_loss:.4f}  '
        f'test acc {test_accuracy:.4f}  ({record["seconds"]:.1f} s){measured}'
      )
      state = _checkpointed(model, optimizer)
      meta = {
        'epoch': epoch + 1,
        'config': _config_for_checkpoint(config),
        'data': fingerprint,
        'history': history,
      }
      checkpoints.save(epoch + 1, state, meta)
      metrics |= {'history': history, 'final': reporting.summary(history)}
      if writes:
        reporting.write_json(workdir / reporting.METRICS_FILE, metrics)
  finally:
    checkpoints.close()
  metrics |= {'history': history, 'final': reporting.summary(history)}
  if not writes:
    return metrics
  reporting.write_json(workdir / reporting.METRICS_FILE, metrics)
  reporting.plot_curves(workdir / reporting.CURVES_FILE, history, title)
  if any('sharpness' in h or 'step_statistics' in h for h in history):
    reporting.plot_sharpness(workdir / reporting.SHARPNESS_PLOT, history, title)
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


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are :class:`ConfigError` (one line, no usage block)."""

  def error(self, message: str):
    raise config_lib.ConfigError(f'{message} (see --help)')


def _typed(kind: type, description: str) -> Callable[[str], Any]:
  def convert(text: str) -> Any:
    try:
      return kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'must be {description}, got {text!r}') from None

  return convert


def build_parser() -> argparse.ArgumentParser:
  """The command line; every flag defaults to :class:`~optax_sam.examples.config.Config`'s value."""
  defaults = config_lib.Config()
  parser = _Parser(
    prog='python -m optax_sam.examples.train',
    description='Train a small residual CNN with a SAM-family optimizer (optax_sam + Flax NNX).',
  )
  number, integer = _typed(float, 'a number'), _typed(int, 'an integer')

  def flag(name, **kwargs):
    names = [f'--{name}'] + ([f'--{name.replace("-", "_")}'] if '-' in name else [])
    dest = name.replace('-', '_')
    default = getattr(defaults, dest, None)
    kwargs.setdefault('default', default)
    parser.add_argument(*names, dest=dest, **kwargs)

  choice = parser.add_mutually_exclusive_group()
  choice.add_argument(
    '--optimizer',
    default=defaults.optimizer,
    help=f'the optimizer: {config_lib.OPTIMIZER_CHOICES} (default: %(default)s)',
  )
  choice.add_argument(
    '--compare',
    metavar='NAMES',
    help='train several optimizers with the same seed and print a table, e.g. sgd,sam,fsam',
  )
  flag('dataset', help=f'{", ".join(data_lib.DATASETS)} (default: %(default)s)')
  flag('rho', type=number, help='SAM radius (default: 0.05, 0.5 with asam)')
  flag('lr', type=number, help='peak learning rate (default: %(default)s)')
  flag('momentum', type=number, help='SGD momentum (default: %(default)s)')
  flag('weight-decay', type=number, help='weight decay of the kernels (default: %(default)s)')
  flag('sigma', type=number, help='F-SAM sigma (default: %(default)s)')
  flag('lmbda', type=number, help='F-SAM EMA decay (default: %(default)s)')
  flag('alpha', type=number, help='GSAM alpha (default: %(default)s)')
  flag('look-alpha', type=number, help='LookSAM alpha (default: %(default)s)')
  flag('sam-every', type=integer, help='SAM on every K-th step only (looksam: its k, default 5)')
  flag('sam-after', type=number, help='SAM only after this fraction of the run, e.g. 0.75')
  flag('eta', type=number, help='ASAM eta (default: 0.01)')
  flag('epochs', type=integer, help='epochs (default: %(default)s)')
  flag('batch-size', type=integer, help='batch size (default: %(default)s)')
  flag('seed', type=integer, help='random seed (default: %(default)s)')
  flag('label-noise', type=number, help='fraction of wrong training labels (default: 0)')
  flag('lr-schedule', help=f'{", ".join(config_lib.LR_SCHEDULES)} (default: %(default)s)')
  flag('dropout', type=number, help='dropout rate (default: %(default)s)')
  flag('width', type=integer, help='channels of the first stage (default: %(default)s)')
  flag('num-samples', type=integer, help='mnist1d examples to generate (default: 5000)')
  flag('data-dir', help='dataset cache / tensorflow-datasets folder')
  flag(
    'sharpness-every',
    type=integer,
    metavar='N',
    help='every N epochs, measure the top Hessian eigenvalue and the SAM sharpness on a fixed '
    f'batch of {SHARPNESS_EXAMPLES} training examples (default: 0, never)',
  )
  flag(
    'm-sharpness',
    type=integer,
    metavar='M',
    help='perturb each group of M examples of a batch with its own gradient (m-sharpness)',
  )
  flag(
    'accumulate',
    type=integer,
    metavar='K',
    help='compute both gradients over K micro-batches, one perturbation for the whole batch',
  )
  flag(
    'group-route',
    help=f'how --m-sharpness runs its groups: {", ".join(config_lib.GROUP_ROUTES)} '
    '(default: %(default)s)',
  )
  parser.add_argument('--workdir', help='output folder (default: runs/<dataset>-<optimizer>)')
  parser.add_argument(
    '--resume', action='store_true', help='continue from the checkpoint in --workdir'
  )
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bars')
  job = parser.add_argument_group(
    'several processes',
    'one process per host, data-parallel over all their devices (see docs/example.md)',
  )
  job.add_argument(
    '--coordinator', metavar='HOST:PORT', help="process 0's address, the same on every process"
  )
  job.add_argument('--num-processes', type=integer, metavar='N', help='processes of the job')
  job.add_argument('--process-id', type=integer, metavar='I', help='this process, 0 to N - 1')
  job.add_argument(
    '--cluster',
    action='store_true',
    help='take the three from the environment (TPU pod, SLURM, Open MPI): '
    'jax.distributed.initialize() with no arguments',
  )
  job.add_argument(
    '--cpu-devices',
    type=integer,
    metavar='K',
    help='run on K (fake) CPU devices per process, gloo collectives between processes',
  )
  return parser


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated command: the runs to do and where their output goes."""

  runs: tuple[tuple[config_lib.Config, pathlib.Path], ...]
  workdir: pathlib.Path
  compare: bool
  resume: bool
  progress: bool
  processes: multiprocess.Processes = multiprocess.Processes()


def make_plan(argv: Optional[Sequence[str]] = None) -> Plan:
  """Parses and validates the command line; creates nothing.

  Raises:
    ConfigError: an argument does not parse, or a value is not allowed.
  """
  args = build_parser().parse_args(argv)
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  base = config_lib.Config(**{k: v for k, v in vars(args).items() if k in fields})
  if args.compare is not None:
    names = [n for n in args.compare.split(',') if n.strip()]
    if len(names) < 1:
      raise config_lib.ConfigError('--compare needs optimizer names separated by commas')
    configs = [dataclasses.replace(base, optimizer=n).validate() for n in names]
    canonical = [c.optimizer for c in configs]
    twice = sorted({c for c in canonical if canonical.count(c) > 1})
    if twice:
      raise config_lib.ConfigError(
        f'--compare names the same optimizer twice ({", ".join(twice)}): {args.compare}'
      )
    workdir = pathlib.Path(args.workdir or f'runs/{base.dataset}-compare')
    runs = tuple((c, workdir / c.optimizer) for c in configs)
  else:
    config = base.validate()
    workdir = pathlib.Path(args.workdir or f'runs/{config.dataset}-{config.optimizer}')
    runs = ((config, workdir),)
  check_writable(workdir)
  processes = multiprocess.Processes(
    args.coordinator, args.num_processes, args.process_id, args.cluster, args.cpu_devices
  ).validate()
  return Plan(runs, workdir, args.compare is not None, args.resume, not args.no_progress, processes)


def check_writable(workdir: pathlib.Path) -> None:
  """Checks that ``workdir`` is, or can be created as, a writable folder (creating nothing).

  Raises:
    ConfigError: it is a file, lies under a file, or its nearest existing folder is read-only.
  """
  path = workdir.absolute()
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise config_lib.ConfigError(
      f'--workdir {workdir} is not usable: {existing} is a file, not a folder'
    )
  if not os.access(existing, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(
      f'--workdir {workdir} is not writable: no permission to write in {existing}'
    )


def _clear_previous_run(workdir: pathlib.Path) -> None:
  """Removes what an earlier run left in ``workdir`` (only the files this script writes)."""
  shutil.rmtree(workdir / CHECKPOINT_DIR, ignore_errors=True)
  for name in (reporting.METRICS_FILE, reporting.CURVES_FILE, reporting.SHARPNESS_PLOT):
    (workdir / name).unlink(missing_ok=True)


def run(
  plan: Plan, log: LogFn = print, parallel: Optional[multiprocess.DataParallel] = None
) -> dict[str, dict]:
  """Loads the data, checks resumability, then trains every run of ``plan``.

  Args:
    plan: the validated command.
    log: where the lines go (process 0's only, with ``parallel``).
    parallel: the mesh of :func:`optax_sam.examples.multiprocess.start`, or ``None``.

  Returns:
    The metrics of each run, by optimizer name.
  """
  writes = parallel is None or parallel.writes
  if not writes:
    log = lambda _: None
  dataset = load_dataset(plan.runs[0][0])
  for config, _ in plan.runs:
    if len(dataset.y_train) < config.batch_size:
      raise config_lib.ConfigError(
        f'--batch-size must be at most the {len(dataset.y_train)} training examples of '
        f'{dataset.name}, got {config.batch_size}'
      )
    if parallel is not None and config.batch_size % parallel.num_devices:
      raise config_lib.ConfigError(
        f'--batch-size must be a multiple of the {parallel.num_devices} devices of all '
        f'processes, got {config.batch_size}'
      )
  fingerprint = data_lib.fingerprint(dataset)
  if plan.resume:
    for config, workdir in plan.runs:
      check_resumable(config, workdir, fingerprint)
  try:
    plan.workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise config_lib.ConfigError(f'--workdir {plan.workdir} cannot be created: {error}') from None

  results = {}
  for config, workdir in plan.runs:
    if not plan.resume and writes:
      _clear_previous_run(workdir)
    if parallel is not None:  # the others wait until process 0 has cleared the folder
      parallel.barrier(f'optax_sam.examples.train: {workdir} cleared')
    if plan.compare:
      log(f'--- {config.optimizer} (rho={config.resolved_rho:g})')
    results[config.optimizer] = train_and_evaluate(
      config,
      workdir,
      dataset=dataset,
      resume=plan.resume,
      progress=plan.progress,
      log=log,
      parallel=parallel,
    )
  if not writes:
    return results
  if plan.compare:
    finals = {name: m['final'] for name, m in results.items()}
    reporting.write_json(plan.workdir / reporting.COMPARISON_FILE, finals)
    reporting.plot_comparison(
      plan.workdir / reporting.COMPARISON_PLOT,
      {name: m['history'] for name, m in results.items()},
      f'{dataset.name}, seed {plan.runs[0][0].seed}',
    )
    log(reporting.format_table(finals))
  else:
    log(f'metrics and plot in {plan.workdir}')
    (metrics,) = results.values()
    log(f'final test accuracy: {metrics["final"]["test_accuracy"]:.4f}')
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command-line entry point; returns the exit status.

  Bad options, a missing dataset or an unusable ``--workdir`` print one line on
  stderr and return 2 before anything is written.
  """
  try:
    plan = make_plan(argv)
    parallel = multiprocess.start(plan.processes)
    if parallel is not None:
      print(parallel.describe(), flush=True)
    run(plan, log=lambda line: print(line, flush=True), parallel=parallel)
  except (config_lib.ConfigError, data_lib.DataError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(
      '\ninterrupted: the last finished epoch is checkpointed; add --resume to continue',
      file=sys.stderr,
    )
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
