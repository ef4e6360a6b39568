"""Trains a small residual CNN with a SAM-family optimizer: ``python -m optax_sam.examples.main``.

The command line of the example, like ``main.py`` in Flax's own examples: it
parses and checks the options, then calls
:func:`optax_sam.examples.train.train_and_evaluate` for each run.
``python -m optax_sam.examples.train`` is the same command.

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
"""

import argparse
import dataclasses
import os
import pathlib
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax

from optax_sam.examples import checkpoints as checkpoints_lib
from optax_sam.examples import config as config_lib
from optax_sam.examples import data as data_lib
from optax_sam.examples import multiprocess, reporting, train

PROG = 'python -m optax_sam.examples.main'


# ----------------------------------------------------------------------------- the options


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


NUMBER, INTEGER = _typed(float, 'a number'), _typed(int, 'an integer')


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
  """The flags of :class:`~optax_sam.examples.config.Config`, each with its default."""
  defaults = config_lib.Config()

  def flag(name, **kwargs):
    names = [f'--{name}'] + ([f'--{name.replace("-", "_")}'] if '-' in name else [])
    dest = name.replace('-', '_')
    kwargs.setdefault('default', getattr(defaults, dest, None))
    parser.add_argument(*names, dest=dest, **kwargs)

  rho = config_lib.library_rho_defaults()
  flag('dataset', help=f'{", ".join(data_lib.DATASETS)} (default: %(default)s)')
  flag(
    'rho',
    type=NUMBER,
    help=f'SAM radius (default: {rho["sam"]:g}, {rho["asam"]:g} with asam; mrwp/marwp: sigma)',
  )
  flag('lr', type=NUMBER, help='peak learning rate (default: %(default)s)')
  flag('momentum', type=NUMBER, help='SGD momentum (default: %(default)s)')
  flag('weight-decay', type=NUMBER, help='weight decay of the kernels (default: %(default)s)')
  flag('sigma', type=NUMBER, help='F-SAM sigma (default: %(default)s)')
  flag('lmbda', type=NUMBER, help='F-SAM EMA decay (default: %(default)s)')
  flag('alpha', type=NUMBER, help='GSAM alpha (default: %(default)s)')
  flag('look-alpha', type=NUMBER, help='LookSAM alpha (default: %(default)s)')
  flag('sam-every', type=INTEGER, help='SAM on every K-th step only (looksam: its k, default 5)')
  flag('sam-after', type=NUMBER, help='SAM only after this fraction of the run, e.g. 0.75')
  flag('eta', type=NUMBER, help=f'ASAM eta (default: {config_lib.Config().resolved_eta:g})')
  flag('epochs', type=INTEGER, help='epochs (default: %(default)s)')
  flag('batch-size', type=INTEGER, help='batch size (default: %(default)s)')
  flag('seed', type=INTEGER, help='random seed (default: %(default)s)')
  flag('label-noise', type=NUMBER, help='fraction of wrong training labels (default: 0)')
  flag('lr-schedule', help=f'{", ".join(config_lib.LR_SCHEDULES)} (default: %(default)s)')
  flag('dropout', type=NUMBER, help='dropout rate (default: %(default)s)')
  flag('width', type=INTEGER, help='channels of the first stage (default: %(default)s)')
  flag('num-samples', type=INTEGER, help='mnist1d examples to generate (default: 5000)')
  flag('data-dir', help='dataset cache / tensorflow-datasets folder')
  flag(
    'sharpness-every',
    type=INTEGER,
    metavar='N',
    help='every N epochs, measure the top Hessian eigenvalue and the SAM sharpness on a fixed '
    f'batch of {train.SHARPNESS_EXAMPLES} training examples (default: 0, never)',
  )
  flag(
    'm-sharpness',
    type=INTEGER,
    metavar='M',
    help='perturb each group of M examples of a batch with its own gradient (m-sharpness)',
  )
  flag(
    'accumulate',
    type=INTEGER,
    metavar='K',
    help='compute both gradients over K micro-batches, one perturbation for the whole batch',
  )
  flag(
    'predictive-samples',
    type=INTEGER,
    metavar='K',
    help='bsam: also test the average over K samples of its posterior (default: 8; 0: off)',
  )
  flag(
    'group-route',
    help=f'how --m-sharpness runs its groups: {", ".join(config_lib.GROUP_ROUTES)} '
    '(default: %(default)s)',
  )


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
  """The flags of a run on several processes (:mod:`~optax_sam.examples.multiprocess`)."""
  job = parser.add_argument_group(
    'several processes',
    'one process per host, data-parallel over all their devices (see docs/example.md)',
  )
  job.add_argument(
    '--coordinator', metavar='HOST:PORT', help="process 0's address, the same on every process"
  )
  job.add_argument('--num-processes', type=INTEGER, metavar='N', help='processes of the job')
  job.add_argument('--process-id', type=INTEGER, metavar='I', help='this process, 0 to N - 1')
  job.add_argument(
    '--cluster',
    action='store_true',
    help='take the three from the environment (TPU pod, SLURM, Open MPI): '
    'jax.distributed.initialize() with no arguments',
  )
  job.add_argument(
    '--cpu-devices',
    type=INTEGER,
    metavar='K',
    help='run on K (fake) CPU devices per process, gloo collectives between processes',
  )


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
  """The command line; every flag defaults to :class:`~optax_sam.examples.config.Config`'s value."""
  parser = _Parser(
    prog=prog,
    description='Train a small residual CNN with a SAM-family optimizer (optax_sam + Flax NNX).',
  )
  choice = parser.add_mutually_exclusive_group()
  choice.add_argument(
    '--optimizer',
    default=config_lib.Config().optimizer,
    help=f'the optimizer: {config_lib.OPTIMIZER_CHOICES} (default: %(default)s)',
  )
  choice.add_argument(
    '--compare',
    metavar='NAMES',
    help='train several optimizers with the same seed and print a table, e.g. sgd,sam,fsam',
  )
  _add_training_flags(parser)
  parser.add_argument('--workdir', help='output folder (default: runs/<dataset>-<optimizer>)')
  parser.add_argument(
    '--resume', action='store_true', help='continue from the checkpoint in --workdir'
  )
  parser.add_argument(
    '--overwrite',
    action='store_true',
    help='replace an earlier run in --workdir (without it, or --resume, an earlier run is kept)',
  )
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bars')
  _add_process_flags(parser)
  return parser


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated command: the runs to do and where their output goes."""

  runs: tuple[tuple[config_lib.Config, pathlib.Path], ...]
  workdir: pathlib.Path
  compare: bool
  resume: bool
  progress: bool
  processes: multiprocess.Processes = multiprocess.Processes()


def _compared_runs(
  base: config_lib.Config, compare: str, workdir: Optional[str]
) -> tuple[pathlib.Path, tuple[tuple[config_lib.Config, pathlib.Path], ...]]:
  """The folder of ``--compare NAMES`` and its runs, one subfolder per optimizer."""
  names = [n for n in compare.split(',') if n.strip()]
  if len(names) < 1:
    raise config_lib.ConfigError('--compare needs optimizer names separated by commas')
  configs = [dataclasses.replace(base, optimizer=n).validate() for n in names]
  canonical = [c.optimizer for c in configs]
  twice = sorted({c for c in canonical if canonical.count(c) > 1})
  if twice:
    raise config_lib.ConfigError(
      f'--compare names the same optimizer twice ({", ".join(twice)}): {compare}'
    )
  folder = pathlib.Path(workdir or f'runs/{base.dataset}-compare')
  return folder, tuple((c, folder / c.optimizer) for c in configs)


def make_plan(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> Plan:
  """Parses and validates the command line; creates nothing.

  Raises:
    ConfigError: an argument does not parse, or a value is not allowed.
  """
  args = build_parser(prog).parse_args(argv)
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  base = config_lib.Config(**{k: v for k, v in vars(args).items() if k in fields})
  if args.compare is not None:
    workdir, runs = _compared_runs(base, args.compare, args.workdir)
  else:
    config = base.validate()
    workdir = pathlib.Path(args.workdir or f'runs/{config.dataset}-{config.optimizer}')
    runs = ((config, workdir),)
  check_writable(workdir)
  if args.resume and args.overwrite:
    raise config_lib.ConfigError('--resume and --overwrite are exclusive: give one of them')
  if not args.resume and not args.overwrite:
    check_no_earlier_run(workdir, [w for _, w in runs])
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


def check_no_earlier_run(workdir: pathlib.Path, run_folders: Sequence[pathlib.Path]) -> None:
  """Checks that no earlier run of this script left its files where this one would write.

  Raises:
    ConfigError: naming the files found, and ``--resume`` and ``--overwrite``.
  """
  names = (reporting.METRICS_FILE, checkpoints_lib.CHECKPOINT_DIR, reporting.CURVES_FILE)
  found = [f / n for f in run_folders for n in names if (f / n).exists()]
  found += [workdir / n for n in (reporting.COMPARISON_FILE,) if (workdir / n).exists()]
  if found:
    shown = ', '.join(str(f) for f in found[:3]) + (', ...' if len(found) > 3 else '')
    raise config_lib.ConfigError(
      f'--workdir {workdir} holds an earlier run ({shown}): add --resume to continue it, '
      '--overwrite to replace it, or give another --workdir'
    )


# ----------------------------------------------------------------------------- the runs


def _check_batch_sizes(
  plan: Plan, dataset: data_lib.Dataset, parallel: Optional[multiprocess.DataParallel]
) -> None:
  """Checks that each run's batch fits the training set and splits over the devices."""
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


def _clear_previous_run(workdir: pathlib.Path) -> None:
  """Removes what an earlier run left in ``workdir`` (only the files this script writes)."""
  shutil.rmtree(workdir / checkpoints_lib.CHECKPOINT_DIR, ignore_errors=True)
  for name in (reporting.METRICS_FILE, reporting.CURVES_FILE, reporting.SHARPNESS_PLOT):
    (workdir / name).unlink(missing_ok=True)


def _header(
  config: config_lib.Config,
  dataset: data_lib.Dataset,
  workdir: pathlib.Path,
  parallel: Optional[multiprocess.DataParallel],
  log: train.LogFn,
) -> None:
  """What a run is about to do: optimizer, data, length, devices, output folder."""
  devices = jax.device_count() if parallel is None else parallel.num_devices
  log(f'optimizer: {config.describe()}')
  epochs = f'{config.epochs} epoch{"s" * (config.epochs != 1)}'
  log(
    f'data: {dataset.name}, {len(dataset.y_train)} train / {len(dataset.y_test)} test examples, '
    f'label noise {config.label_noise:g}; {epochs} of batch {config.batch_size}, seed {config.seed}'
  )
  log(f'devices: {devices} ({jax.default_backend()}); output: {workdir}')


def _report(plan: Plan, results: dict[str, dict], dataset_name: str, log: train.LogFn) -> None:
  """The comparison's table, plot and file, or the single run's last lines."""
  if plan.compare:
    finals = {name: m['final'] for name, m in results.items()}
    reporting.write_json(plan.workdir / reporting.COMPARISON_FILE, finals)
    reporting.plot_comparison(
      plan.workdir / reporting.COMPARISON_PLOT,
      {name: m['history'] for name, m in results.items()},
      f'{dataset_name}, seed {plan.runs[0][0].seed}',
    )
    log(reporting.format_table(finals))
  else:
    log(f'metrics and plot in {plan.workdir}')
    (metrics,) = results.values()
    log(f'final test accuracy: {metrics["final"]["test_accuracy"]:.4f}')


def run(
  plan: Plan, log: train.LogFn = print, parallel: Optional[multiprocess.DataParallel] = None
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
  dataset = train.load_dataset(plan.runs[0][0])
  _check_batch_sizes(plan, dataset, parallel)
  fingerprint = data_lib.fingerprint(dataset)
  if plan.resume:
    for config, workdir in plan.runs:
      checkpoints_lib.check_resumable(config, workdir, fingerprint)
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
      log(f'--- {config.optimizer}')
    _header(config, dataset, workdir, parallel, log)
    results[config.optimizer] = train.train_and_evaluate(
      config,
      workdir,
      dataset=dataset,
      resume=plan.resume,
      progress=plan.progress,
      log=log,
      parallel=parallel,
    )
  if writes:
    _report(plan, results, dataset.name, log)
  return results


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
  """The command-line entry point; returns the exit status.

  Bad options, a missing dataset or an unusable ``--workdir`` print one line on
  stderr and return 2 before anything is written.
  """
  try:
    plan = make_plan(argv, prog)
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
