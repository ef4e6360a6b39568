"""The example's hyperparameters, their defaults and their validation, and the optimizer names.

Optimizer names are ``sgd``, ``sam``, ``usam``, ``asam``, ``fsam``, ``stablesam``
and ``gsam``, or SAM variants joined by ``+``: ``fsam+stable``, ``asam+stable``,
``usam+stable``, ``sam+stable``, ``fsam+asam``, ``fsam+asam+stable``... Each part
switches on one feature of :func:`optax_sam.sam`: ``usam`` the unnormalized
ascent, ``asam`` ASAM's scaling (``eta = 0.01``, biases not scaled), ``fsam``
Friendly-SAM's direction, ``stable`` StableSAM's renormalization.

The cheaper variants are ``looksam`` (LookSAM: SAM every ``--sam-every``
steps, default 5, its direction reused in between) and ``msam`` (Momentum-SAM:
one gradient per step). ``--sam-every K`` or ``--sam-after F`` (a fraction of
the run) make any other SAM variant take its second gradient on some steps
only.

``--m-sharpness M`` perturbs each group of ``M`` examples of a batch with its
own gradient (m-sharpness, the same on any number of devices), and
``--accumulate K`` computes both gradients of the step over ``K``
micro-batches (one perturbation for the whole batch); see
:func:`optax_sam.micro_batches` and :func:`optax_sam.accumulated_grad_fn`.
"""

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any, Optional

import optax

import optax_sam
from optax_sam._src import aliases
from optax_sam.examples import data

# Named optimizers that are not wrappers: they take a learning rate, not a base optimizer.
OWN_OPTIMIZERS = {'bsam': optax_sam.bsam}
# SGD and the library's named variants (optax_sam._src.aliases.VARIANTS), in its order, and bSAM.
SINGLE_OPTIMIZERS = ('sgd', *aliases.VARIANTS, *OWN_OPTIMIZERS)
COMBINABLE = ('sam', 'usam', 'asam', 'fsam', 'stable')
LR_SCHEDULES = ('cosine', 'constant')
GROUP_ROUTES = ('vmap', 'scan')
# Variants built by their alias with its defaults (the radius from --rho).
NAMED = ('wsam', 'vasso', 'gcsam', 'unifiedsam', 'lookbehind', 'sampa', 'mrwp', 'marwp', 'bsam')
# Named variants with their own step shape: no --sam-every/--sam-after, --m-sharpness, --accumulate.
OWN_STEP = ('lookbehind', 'sampa')
# Named variants without SAM-or-plain steps (no --sam-every/--sam-after); bSAM takes --m-sharpness
# (each group its own posterior sample, the authors' --batchsplit).
NO_POLICY = (*OWN_STEP, 'bsam')
OPTIMIZER_CHOICES = (
  'sgd, sam, usam, asam, fsam, stablesam, gsam, looksam, msam, wsam, vasso, gcsam, unifiedsam, '
  'lookbehind, sampa, mrwp, marwp, bsam, '
  'or SAM variants joined by + '
  '(parts sam, usam, asam, fsam, stable; e.g. fsam+stable, asam+stable, usam+stable, fsam+asam)'
)

# Options a resumed run must share with the run that wrote the checkpoint.
RESUMABLE_CHANGES = ('epochs', 'sharpness_every')


class ConfigError(ValueError):
  """An option has a value that is not allowed; the message says what is."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """What an optimizer name asks for.

  Attributes:
    name: the canonical name (parts in the order fsam, asam, usam/sam, stable).
    sam: whether it is a SAM variant at all (``False`` for ``sgd``).
    friendly: Friendly-SAM's ascent direction.
    adaptive: ASAM's scaling.
    normalize: the normalized (SAM) ascent; ``False`` is USAM's.
    stable: StableSAM's renormalization.
    gsam: GSAM's correction.
    look: LookSAM (SAM every ``k`` steps, its direction reused in between).
    momentum: Momentum-SAM (the ascent along SGD's momentum, no second gradient).
    named: one of :data:`NAMED`, built by its alias with its defaults.
  """

  name: str
  sam: bool = True
  friendly: bool = False
  adaptive: bool = False
  normalize: bool = True
  stable: bool = False
  gsam: bool = False
  look: bool = False
  momentum: bool = False
  named: Optional[str] = None


def parse_optimizer(name: str) -> OptimizerSpec:
  """Parses an optimizer name such as ``sam``, ``stablesam`` or ``fsam+stable``.

  Args:
    name: the name (case-insensitive).

  Returns:
    The :class:`OptimizerSpec`.

  Raises:
    ConfigError: the name is not one of :data:`OPTIMIZER_CHOICES`.

  Example:
    >>> from optax_sam.examples import config
    >>> spec = config.parse_optimizer('asam+stable')
    >>> spec.adaptive, spec.stable, spec.normalize
    (True, True, True)
    >>> config.parse_optimizer('stablesam') == config.parse_optimizer('usam+stable')
    True
  """
  text = name.strip().lower()
  if text == 'sgd':
    return OptimizerSpec('sgd', sam=False)
  if text == 'gsam':
    return OptimizerSpec('gsam', gsam=True)
  if text == 'looksam':
    return OptimizerSpec('looksam', look=True)
  if text == 'msam':
    return OptimizerSpec('msam', momentum=True)
  if text in NAMED:
    return OptimizerSpec(text, named=text)
  if text == 'stablesam':
    text = 'usam+stable'  # the StableSAM paper's optimizer: USAM plus renormalization
  parts = text.split('+')
  unknown = [p for p in parts if p not in COMBINABLE]
  if unknown or len(set(parts)) != len(parts) or {'sam', 'usam'} <= set(parts) or not text:
    raise ConfigError(f'unknown optimizer {name!r}; choose from {OPTIMIZER_CHOICES}')
  spec = OptimizerSpec(
    name='',
    friendly='fsam' in parts,
    adaptive='asam' in parts,
    normalize='usam' not in parts,
    stable='stable' in parts,
  )
  canonical = [p for p in ('fsam', 'asam') if p in parts]
  if not spec.normalize:
    canonical.append('usam')
  if spec.stable:
    canonical.append('stable')
  canonical = canonical or ['sam']
  if canonical == ['usam', 'stable']:
    canonical = ['stablesam']
  if canonical == ['stable']:
    canonical = ['sam', 'stable']
  return dataclasses.replace(spec, name='+'.join(canonical))


def library_default(optimizer: Callable[..., Any], name: str) -> Any:
  """The default of ``optimizer``'s parameter ``name``, read from its signature.

  Example:
    >>> import optax_sam
    >>> from optax_sam.examples import config
    >>> config.library_default(optax_sam.asam, 'rho')
    0.5
  """
  return inspect.signature(optimizer).parameters[name].default


def radius_name(optimizer: Callable[..., Any]) -> str:
  """The name of ``optimizer``'s radius: its parameter after the base optimizer.

  Example:
    >>> import optax_sam
    >>> from optax_sam.examples import config
    >>> config.radius_name(optax_sam.sam), config.radius_name(optax_sam.mrwp)
    ('rho', 'sigma')
  """
  return list(inspect.signature(optimizer).parameters)[1]


def library_rho_defaults() -> dict[str, float]:
  """The library's default ``rho`` of each optimizer the example's names build."""
  return {
    'sam': library_default(optax_sam.sam, 'rho'),
    'asam': library_default(optax_sam.asam, 'rho'),
    'fsam': library_default(optax_sam.friendly_sam, 'rho'),
    'gsam': library_default(optax_sam.gsam, 'rho'),
    'looksam': library_default(optax_sam.look_sam, 'rho'),
    'msam': library_default(optax_sam.momentum_sam, 'rho'),
  }


def bsam_for_sgd(
  learning_rate: optax.ScalarOrSchedule,
  rho: float,
  momentum: float,
  weight_decay: float,
  data_size: int,
) -> optax.GradientTransformationExtraArgs:
  """:func:`optax_sam.bsam` in place of SGD with momentum and weight decay.

  Its ``beta1`` is the momentum and its prior precision the weight decay times ``N``
  (``data_size``, the examples of an epoch): the weight decay of SGD is the prior precision per
  example.
  """
  return optax_sam.bsam(
    learning_rate,
    rho,
    beta1=momentum,
    data_size=data_size,
    prior_precision=weight_decay * data_size,
  )


def default_rho(spec: OptimizerSpec) -> float:
  """The radius the library's optimizer defaults to (0 for SGD).

  A name with ASAM's scaling takes :func:`optax_sam.asam`'s, whatever else it
  combines; ``looksam``, ``msam``, ``gsam``, ``fsam`` and the named variants
  their own aliases' (``mrwp``, ``marwp``: their ``sigma``); the others :func:`optax_sam.sam`'s.

  Example:
    >>> from optax_sam.examples import config
    >>> [config.default_rho(config.parse_optimizer(n)) for n in ('sgd', 'sam', 'fsam+asam')]
    [0.0, 0.05, 0.5]
  """
  if not spec.sam:
    return 0.0
  if spec.named:  # the radius: the parameter after the base optimizer (m-RWP's sigma)
    optimizer = OWN_OPTIMIZERS.get(spec.named) or aliases.VARIANTS[spec.named]
    return library_default(optimizer, radius_name(optimizer))
  defaults = library_rho_defaults()
  if spec.look:
    return defaults['looksam']
  if spec.momentum:
    return defaults['msam']
  if spec.adaptive:
    return defaults['asam']
  if spec.gsam:
    return defaults['gsam']
  return defaults['fsam'] if spec.friendly else defaults['sam']


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of one training run; ``None`` means "the default for this optimizer/dataset".

  Attributes:
    optimizer: an optimizer name (see :func:`parse_optimizer`).
    dataset: ``mnist1d``, ``digits`` or ``cifar10``.
    rho: SAM radius (default: :func:`default_rho`).
    lr: peak learning rate of SGD.
    momentum: SGD momentum, in ``[0, 1)``.
    weight_decay: L2 weight decay on the convolution and dense kernels.
    sigma: F-SAM's ``sigma``, in ``[0, 1]``.
    lmbda: F-SAM's EMA decay, in ``[0, 1]``.
    alpha: GSAM's ``alpha`` (``>= 0``).
    look_alpha: LookSAM's ``alpha`` (``>= 0``).
    sam_every: SAM on every ``k``-th step only (LookSAM's ``k``, default 5 there).
    sam_after: SAM only after this fraction of the run's steps, in ``[0, 1]``.
    eta: ASAM's offset (default 0.01).
    epochs: training epochs.
    batch_size: examples per step.
    seed: seed of the initialization, the batch order, dropout and label noise.
    label_noise: fraction of training labels replaced by wrong ones, in ``[0, 1)``.
    lr_schedule: ``cosine`` (to 0 over the run) or ``constant``.
    dropout: dropout rate before the classifier, in ``[0, 1)``.
    width: channels of the first stage (doubled at each of the three stages).
    num_samples: MNIST-1D only: examples to generate (default 5000: 4000 train, 1000 test).
    data_dir: dataset cache folder (see :func:`optax_sam.examples.data.load`).
    sharpness_every: measure the top Hessian eigenvalue and the SAM sharpness
      every this many epochs (and after the last one); 0: never.
    m_sharpness: perturb each group of this many examples of a batch with its
      own gradient (:func:`optax_sam.micro_batches`); must divide
      ``batch_size``.
    accumulate: compute both gradients of a step over this many micro-batches,
      one perturbation for the whole batch
      (:func:`optax_sam.accumulated_grad_fn`); must divide ``batch_size``.
    group_route: how ``m_sharpness`` runs its groups, ``scan`` (one after
      another; memory independent of the number of groups, and the faster one
      for this CNN on CPU) or ``vmap`` (side by side).
    predictive_samples: ``bsam`` only: after training, also test the model
      average over this many samples of its posterior
      (:func:`optax_sam.posterior_samples`; default 8; 0: the mean only).
  """

  optimizer: str = 'sam'
  dataset: str = 'mnist1d'
  rho: Optional[float] = None
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  sigma: float = 1.0
  lmbda: float = 0.9
  alpha: float = 0.4
  look_alpha: float = 0.7
  sam_every: Optional[int] = None
  sam_after: Optional[float] = None
  eta: Optional[float] = None
  epochs: int = 20
  batch_size: int = 128
  seed: int = 0
  label_noise: float = 0.0
  lr_schedule: str = 'cosine'
  dropout: float = 0.1
  width: int = 32
  num_samples: Optional[int] = None
  data_dir: Optional[str] = None
  sharpness_every: int = 0
  m_sharpness: Optional[int] = None
  accumulate: Optional[int] = None
  group_route: str = 'scan'
  predictive_samples: Optional[int] = None

  @property
  def spec(self) -> OptimizerSpec:
    """The parsed optimizer name."""
    return parse_optimizer(self.optimizer)

  @property
  def resolved_rho(self) -> float:
    """``rho``, or the optimizer's default."""
    return default_rho(self.spec) if self.rho is None else self.rho

  @property
  def resolved_predictive_samples(self) -> int:
    """``predictive_samples``, or 8 for ``bsam`` (0 for the others)."""
    if self.predictive_samples is not None:
      return self.predictive_samples
    return 8 if self.spec.named == 'bsam' else 0

  @property
  def resolved_eta(self) -> float:
    """``eta``, or :func:`optax_sam.asam`'s default."""
    return library_default(optax_sam.asam, 'eta') if self.eta is None else self.eta

  def validate(self) -> 'Config':
    """Checks every value; returns the config with the optimizer name made canonical.

    Raises:
      ConfigError: with the option's name and the allowed values.
    """
    spec = parse_optimizer(self.optimizer)
    if self.dataset not in data.DATASETS:
      raise ConfigError(f'unknown dataset {self.dataset!r}; choose from {", ".join(data.DATASETS)}')
    if self.lr_schedule not in LR_SCHEDULES:
      raise ConfigError(
        f'unknown lr schedule {self.lr_schedule!r}; choose from {", ".join(LR_SCHEDULES)}'
      )
    _check('rho', self.rho, low=0.0, optional=True)
    _check('lr', self.lr, low=0.0, low_open=True)
    _check('momentum', self.momentum, low=0.0, high=1.0, high_open=True)
    _check('weight_decay', self.weight_decay, low=0.0)
    _check('sigma', self.sigma, low=0.0, high=1.0)
    _check('lmbda', self.lmbda, low=0.0, high=1.0)
    _check('alpha', self.alpha, low=0.0)
    _check('look_alpha', self.look_alpha, low=0.0)
    _check_int('sam_every', self.sam_every, 1, optional=True)
    _check('sam_after', self.sam_after, low=0.0, high=1.0, optional=True)
    if self.sam_every is not None and self.sam_after is not None:
      raise ConfigError('--sam-every and --sam-after are exclusive: give one of them')
    when = self.sam_every is not None or self.sam_after is not None
    if when and (not spec.sam or spec.momentum):
      raise ConfigError(
        f'--sam-every/--sam-after choose SAM steps; {spec.name} takes no second gradient'
      )
    if spec.look and self.sam_after is not None:
      raise ConfigError('--sam-after does not apply to looksam: its period is --sam-every')
    if when and spec.named in NO_POLICY:
      raise ConfigError(
        f'--sam-every/--sam-after do not apply to {spec.named}: it has its own step shape'
      )
    _check('eta', self.eta, low=0.0, optional=True)
    _check('label_noise', self.label_noise, low=0.0, high=1.0, high_open=True)
    _check('dropout', self.dropout, low=0.0, high=1.0, high_open=True)
    _check_int('epochs', self.epochs, 1)
    _check_int('batch_size', self.batch_size, 1)
    _check_int('seed', self.seed, 0)
    _check_int('width', self.width, 1)
    _check_int('sharpness_every', self.sharpness_every, 0)
    _check_int('num_samples', self.num_samples, 20, optional=True)
    _check_micro_batches(self, spec)
    _check_int('predictive_samples', self.predictive_samples, 0, optional=True)
    if self.predictive_samples is not None and spec.named != 'bsam':
      raise ConfigError(f"--predictive-samples samples bsam's posterior; {spec.name} keeps none")
    if self.num_samples is not None and self.dataset != 'mnist1d':
      raise ConfigError(f'--num-samples applies to mnist1d only, not to {self.dataset}')
    return dataclasses.replace(self, optimizer=spec.name)

  def to_dict(self) -> dict[str, Any]:
    """The options as a JSON-ready dictionary."""
    return dataclasses.asdict(self)

  def describe(self) -> str:
    """The optimizer and the hyperparameters it uses, in one line (the run's header).

    Example:
      >>> from optax_sam.examples import config
      >>> print(config.Config(optimizer='fsam', sam_every=5).describe())
      fsam (rho 0.05, sigma 1, lmbda 0.9, SAM every 5 steps) around SGD (lr 0.05 cosine, momentum 0.9, weight decay 0.0005)
    """  # noqa: E501
    spec, parts = self.spec, []
    if spec.sam:
      parts.append(f'rho {self.resolved_rho:g}')
    if spec.friendly:
      parts += [f'sigma {self.sigma:g}', f'lmbda {self.lmbda:g}']
    if spec.adaptive:
      parts.append(f'eta {self.resolved_eta:g}')
    if spec.gsam:
      parts.append(f'alpha {self.alpha:g}')
    if spec.look:
      parts += [f'alpha {self.look_alpha:g}', f'k {self.sam_every or 5}']
    elif self.sam_every is not None:
      parts.append(f'SAM every {self.sam_every} steps')
    if self.sam_after is not None:
      parts.append(f'SAM after {self.sam_after:g} of the steps')
    if self.m_sharpness is not None:
      parts.append(f'm {self.m_sharpness} ({self.group_route} route)')
    if self.accumulate is not None:
      parts.append(f'{self.accumulate} micro-batches')
    if spec.named == 'bsam':  # its own optimizer: the posterior's precision divides its step
      return (
        f'bsam ({", ".join(parts)}, lr {self.lr:g} {self.lr_schedule}, beta1 {self.momentum:g}, '
        f'prior precision {self.weight_decay:g} x N)'
      )
    base = (
      f'SGD (lr {self.lr:g} {self.lr_schedule}, momentum {self.momentum:g}, '
      f'weight decay {self.weight_decay:g})'
    )
    if not spec.sam:
      return base
    return f'{spec.name} ({", ".join(parts)}) around {base}'


def _check_micro_batches(config: Config, spec: OptimizerSpec) -> None:
  _check_int('m_sharpness', config.m_sharpness, 1, optional=True)
  _check_int('accumulate', config.accumulate, 1, optional=True)
  if config.group_route not in GROUP_ROUTES:
    raise ConfigError(
      f'unknown group route {config.group_route!r}; choose from {", ".join(GROUP_ROUTES)}'
    )
  if config.m_sharpness is not None and config.accumulate is not None:
    raise ConfigError(
      '--m-sharpness and --accumulate are exclusive: accumulation with one perturbation per '
      'micro-batch is --m-sharpness BATCH_SIZE/K --group-route scan'
    )
  for name, value in (('m_sharpness', config.m_sharpness), ('accumulate', config.accumulate)):
    if value is not None and config.batch_size % value:
      raise ConfigError(
        f'--{name.replace("_", "-")} must divide --batch-size {config.batch_size}, got {value}'
      )
  grouped = config.m_sharpness is not None or config.accumulate is not None
  if grouped and spec.named in OWN_STEP:
    raise ConfigError(
      f'--m-sharpness/--accumulate do not apply to {spec.named}: it takes its gradients itself'
    )
  if config.m_sharpness is not None and (not spec.sam or spec.momentum):
    raise ConfigError(
      f'--m-sharpness perturbs groups for the second gradient; {spec.name} takes none'
    )
  if config.group_route != Config.group_route and config.m_sharpness is None:
    raise ConfigError('--group-route applies to --m-sharpness only')


def _check(name, value, low=None, high=None, low_open=False, high_open=False, optional=False):
  if value is None and optional:
    return
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    left = '(' if low_open else '['
    right = ')' if high_open else ']'
    if high is None:
      allowed = f'> {low:g}' if low_open else f'>= {low:g}'
    else:
      allowed = f'in {left}{low:g}, {high:g}{right}'
    raise ConfigError(f'--{name.replace("_", "-")} must be {allowed}, got {value!r}')


def _check_int(name, value, low, optional=False):
  if value is None and optional:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ConfigError(f'--{name.replace("_", "-")} must be an integer >= {low}, got {value!r}')
