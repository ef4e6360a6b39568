"""The example on several processes: ``jax.distributed``, a data-parallel mesh, each process's rows.

Multi-controller JAX runs one Python process per host; every process runs the
same program on the global mesh of all devices. The example uses it for data
parallelism only:

* the parameters, BatchNorm statistics, RNG state and optimizer state are
  replicated over the mesh (one logical array, a copy on every device);
* each global batch (the same on every process: the batch order depends only
  on ``(seed, epoch)``) is split along the mesh's ``data`` axis, and each
  process hands over only its own rows, from which
  ``jax.make_array_from_process_local_data`` builds the global array.

Under ``jax.jit`` the gradient of the mean loss over a batch split that way is
the global gradient, so SAM's perturbation is global: 2 processes with 4
devices each compute what 1 process with 8 devices computes. Process 0 alone
prints and writes ``metrics.json`` and the plots; Orbax checkpoints are saved
and restored by every process (Orbax coordinates them), into a folder every
process sees.

Example:
  >>> from optax_sam.examples import multiprocess
  >>> job = multiprocess.Processes(coordinator='localhost:12355', num_processes=2, process_id=1)
  >>> job.validate().distributed
  True
  >>> multiprocess.start(multiprocess.Processes()) is None  # the ordinary single-device run
  True
"""

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_sam.examples import config as config_lib

AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class Processes:
  """How the processes of a run find each other, and the devices each one has.

  With no field set the run is the ordinary single-process, single-device one.

  Attributes:
    coordinator: ``HOST:PORT`` of the coordination service, which process 0 starts
      (``jax.distributed.initialize``'s ``coordinator_address``).
    num_processes: the number of processes of the job.
    process_id: this process's id, in ``[0, num_processes)``.
    cluster: join a job whose coordinator, size and ids JAX detects from the
      environment (TPU pod slices, SLURM, Open MPI, Kubernetes):
      ``jax.distributed.initialize()`` with no arguments.
    cpu_devices: give this process that many CPU devices (fake ones, for
      trying the layout on one machine); CPU collectives across processes use gloo.
  """

  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  cluster: bool = False
  cpu_devices: Optional[int] = None

  @property
  def explicit(self) -> bool:
    """Whether the coordinator, the process count and the id are given."""
    return self.coordinator is not None

  @property
  def distributed(self) -> bool:
    """Whether the process joins a ``jax.distributed`` job."""
    return self.explicit or self.cluster

  @property
  def data_parallel(self) -> bool:
    """Whether the run splits its batches over a mesh (several processes or ``cpu_devices``)."""
    return self.distributed or self.cpu_devices is not None

  def validate(self) -> 'Processes':
    """Checks the options; returns them unchanged.

    Raises:
      ConfigError: the three job options are not given together, a value is out
        of range, or ``cluster`` is combined with them.
    """
    given = {
      '--coordinator': self.coordinator,
      '--num-processes': self.num_processes,
      '--process-id': self.process_id,
    }
    named = [name for name, value in given.items() if value is not None]
    if named and len(named) < 3:
      raise config_lib.ConfigError(
        '--coordinator, --num-processes and --process-id go together; got only ' + ', '.join(named)
      )
    if named and self.cluster:
      raise config_lib.ConfigError(
        '--cluster detects the coordinator, --num-processes and --process-id from the '
        'environment; give either --cluster or those three'
      )
    if self.explicit:
      host, _, port = self.coordinator.rpartition(':')
      if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise config_lib.ConfigError(
          f'--coordinator must be HOST:PORT (e.g. localhost:12355), got {self.coordinator!r}'
        )
      if not isinstance(self.num_processes, int) or self.num_processes < 1:
        raise config_lib.ConfigError(
          f'--num-processes must be an integer >= 1, got {self.num_processes!r}'
        )
      if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
        raise config_lib.ConfigError(
          f'--process-id must be in [0, {self.num_processes}) for --num-processes '
          f'{self.num_processes}, got {self.process_id!r}'
        )
    if self.cpu_devices is not None and (
      not isinstance(self.cpu_devices, int) or self.cpu_devices < 1
    ):
      raise config_lib.ConfigError(
        f'--cpu-devices must be an integer >= 1, got {self.cpu_devices!r}'
      )
    return self


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """A one-axis mesh of every device of every process, and how the example's arrays go on it.

  Attributes:
    mesh: the mesh, axis ``data``.
  """

  mesh: jax.sharding.Mesh

  @property
  def num_devices(self) -> int:
    """Devices of the mesh, over all processes."""
    return self.mesh.size

  @property
  def writes(self) -> bool:
    """Whether this process prints and writes the run's files (process 0 does)."""
    return jax.process_index() == 0

  def describe(self) -> str:
    """One line: this process, its devices and the job."""
    return (
      f'process {jax.process_index()} of {jax.process_count()}: '
      f'{jax.local_device_count()} of {self.num_devices} {jax.default_backend()} devices'
    )

  def replicate(self, tree: Any) -> Any:
    """``tree`` with every array copied to every device of the mesh (one global array each).

    Every process must pass the same values: each one places its own copy.
    """
    replicated = NamedSharding(self.mesh, P())

    def place(leaf):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # RNG keys: via their data
        data = place(jax.random.key_data(leaf))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
      return jax.make_array_from_process_local_data(replicated, np.asarray(leaf))

    return jax.tree.map(place, tree)

  def rows(self, num_rows: int) -> slice:
    """This process's rows of a batch of ``num_rows`` split over the mesh.

    Raises:
      ValueError: ``num_rows`` is not a multiple of the number of devices.
    """
    if num_rows % self.num_devices:
      raise ValueError(
        f'a batch of {num_rows} does not split over {self.num_devices} devices; '
        f'use a multiple of {self.num_devices}'
      )
    split = NamedSharding(self.mesh, P(AXIS))
    spans = {
      (index[0].start or 0, index[0].stop or num_rows)
      for index in split.addressable_devices_indices_map((num_rows,)).values()
    }
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
      raise ValueError(f'the devices of process {jax.process_index()} hold rows that are apart')
    return slice(start, stop)

  def batch(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Global arrays split along their first axis, built from this process's rows only.

    Args:
      *arrays: the whole global batch (the same on every process), e.g. inputs and labels.

    Returns:
      One global ``jax.Array`` per input, sharded over the mesh's ``data`` axis.
    """
    split = NamedSharding(self.mesh, P(AXIS))
    out = []
    for array in arrays:
      rows = self.rows(len(array))
      out.append(jax.make_array_from_process_local_data(split, array[rows], array.shape))
    return tuple(out)

  def padded_size(self, batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of the number of devices."""
    return -(-batch_size // self.num_devices) * self.num_devices

  def barrier(self, name: str) -> None:
    """Waits until every process gets here (after process 0 changed the shared files)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(name)


def start(processes: Processes) -> Optional[DataParallel]:
  """Sets up the devices and joins the job; call it before anything else uses JAX.

  Args:
    processes: the validated options.

  Returns:
    The data-parallel mesh over every device of every process, or ``None`` for
    the ordinary single-device run (no option given).
  """
  if not processes.data_parallel:
    return None
  if processes.cpu_devices is not None:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', processes.cpu_devices)
  if processes.distributed:
    # CPU devices of different processes talk through gloo (GPUs and TPUs ignore this).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if processes.explicit:
    jax.distributed.initialize(
      coordinator_address=processes.coordinator,
      num_processes=processes.num_processes,
      process_id=processes.process_id,
    )
  elif processes.cluster:
    jax.distributed.initialize()
  return data_parallel()


def data_parallel() -> DataParallel:
  """The one-axis mesh of every device of every process of the job (JAX already started).

  Example:
    >>> import jax
    >>> from optax_sam.examples import multiprocess
    >>> multiprocess.data_parallel().num_devices == jax.device_count()
    True
  """
  # Auto axes: XLA propagates the batch's sharding (no sharding in the types).
  auto = (jax.sharding.AxisType.Auto,)
  return DataParallel(jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=auto))
