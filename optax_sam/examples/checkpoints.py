"""Orbax checkpoints of the example: one per epoch, and the checks a ``--resume`` must pass.

A checkpoint holds a tree of NNX states and arrays (:func:`training_state`:
the model at its clean weights, the optimizer state, and the weights training
continues from when they differ) next to a JSON part (the epoch, the options,
the data's fingerprint and the history so far). :func:`check_resumable` reads
only the JSON part, so a bad ``--resume`` is refused before anything is
trained or written.
"""

import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_sam.examples import config as config_lib

CHECKPOINT_DIR = 'checkpoints'


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


def training_state(model: nnx.Module, optimizer: nnx.Optimizer, clean: nnx.Module) -> dict:
  """What a checkpoint holds: ``clean`` (the model at its clean weights), the optimizer state,
  and when ``model`` holds other weights than ``clean`` (Momentum-SAM's ``w - rho v / ||v||``)
  those too (``held``), from which training continues."""
  state = {'model': nnx.state(clean), 'optimizer': nnx.state(optimizer)}
  if clean is not model:
    state['held'] = nnx.state(model, nnx.Param)
  return state


def load_training_state(model: nnx.Module, optimizer: nnx.Optimizer, state: dict) -> None:
  """Puts a restored :func:`training_state` back into ``model`` and ``optimizer``."""
  nnx.update(model, state['model'])
  nnx.update(optimizer, state['optimizer'])
  if 'held' in state:  # Momentum-SAM: the weights training continues from
    nnx.update(model, state['held'])


def config_for_checkpoint(config: config_lib.Config) -> dict:
  """The options a checkpoint records: those a resumed run must share with it."""
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
  saved, wanted = meta['config'], config_for_checkpoint(config)
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
