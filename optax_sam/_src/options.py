"""The SAM wrapper's shared options, validated once, and the parts a SAM optimizer is made of."""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, TypedDict, TypeVar

import optax

from optax_sam._src import corrections, numerics, policies

_FLAGS = ('local_perturbation', 'two_phase', 'statistics', 'perturb_in_param_dtype')


@dataclasses.dataclass(frozen=True)
class SAMOptions:
  """How a SAM optimizer runs, whatever its perturbation and correction.

  Every alias takes these as keyword arguments (:class:`OptionArguments`, spelled
  out in its signature by :func:`takes_options`) and hands them on as
  ``SAMOptions(**options)``; :func:`sharpness_aware` documents each.

  Attributes:
    axis_name: the ``pmap``/``shard_map`` axis (or axes) to average over, or ``None``.
    local_perturbation: each device perturbs with its own gradient (needs ``axis_name``).
    two_phase: alternating calls instead of ``grad_fn``.
    statistics: keep the step's statistics in the state.
    perturb_in_param_dtype: ``grad_fn`` sees ``w + e`` in the params' dtype.
    when: a :class:`Policy` choosing the SAM steps, or ``None`` (every step).
  """

  axis_name: Any = None
  local_perturbation: bool = False
  two_phase: bool = False
  statistics: bool = False
  perturb_in_param_dtype: bool = False
  when: Optional[policies.Policy] = None

  def __post_init__(self):
    for name in _FLAGS:
      object.__setattr__(self, name, numerics.check_flag(name, getattr(self, name)))
    if self.when is not None and not isinstance(self.when, policies.Policy):
      raise TypeError(
        'when must be a Policy: optax_sam.every(k), optax_sam.after(n), '
        f'optax_sam.randomly(p, seed) or optax_sam.ae_sam(...) (or None); got {self.when!r}.'
      )
    if self.local_perturbation and self.axis_name is None:
      raise ValueError('local_perturbation=True needs axis_name (the axis of pmap or shard_map).')

  def check_supported(self, method: str, supported: tuple[str, ...], why: str) -> None:
    """Raises ``ValueError`` naming the options ``method``'s step shape does not have.

    Args:
      method: the factory's name, for the message.
      supported: the option names it honours.
      why: the reason the others are not available, for the message.
    """
    chosen = [
      f.name
      for f in dataclasses.fields(self)
      if f.name not in supported and getattr(self, f.name) != f.default
    ]
    if chosen:
      raise ValueError(f'{method} does not take {", ".join(chosen)}: {why}')


class OptionArguments(TypedDict, total=False):
  """:class:`SAMOptions` as keyword arguments: an alias's ``**options: Unpack[OptionArguments]``."""

  axis_name: Any
  local_perturbation: bool
  two_phase: bool
  statistics: bool
  perturb_in_param_dtype: bool
  when: Optional[policies.Policy]


Factory = TypeVar('Factory', bound=Callable[..., Any])


def takes_options(factory: Factory) -> Factory:
  """``factory`` with the :class:`SAMOptions` fields as explicit keyword-only parameters.

  An alias is written ``def alias(base_optimizer, rho=..., *, its_hyperparameters...,
  **options: Unpack[OptionArguments])`` and hands ``SAMOptions(**options)`` on. This decorator
  gives it the signature with the six options spelled out (their defaults those of
  :class:`SAMOptions`), which is what ``optax.inject_hyperparams``, ``help`` and the API reference
  read, and rejects an unknown keyword with Python's own ``TypeError``.

  Args:
    factory: a function whose last parameter is ``**options``.

  Returns:
    The function with the explicit signature.
  """
  signature = inspect.signature(factory)
  *own, var_keyword = signature.parameters.values()
  assert var_keyword.kind is inspect.Parameter.VAR_KEYWORD, factory
  hints = OptionArguments.__annotations__
  keyword = inspect.Parameter.KEYWORD_ONLY
  shared = [
    inspect.Parameter(f.name, keyword, default=f.default, annotation=hints[f.name])
    for f in dataclasses.fields(SAMOptions)
  ]
  explicit = signature.replace(parameters=[*own, *shared])

  @functools.wraps(factory)
  def with_explicit_signature(*args, **kwargs):
    explicit.bind(*args, **kwargs)  # an unknown or repeated keyword: the usual TypeError
    return factory(*args, **kwargs)

  with_explicit_signature.__signature__ = explicit
  return with_explicit_signature  # type: ignore[return-value]


class Spec(NamedTuple):
  """The parts of a SAM optimizer: what the step functions run.

  Attributes:
    base: the base optimizer (with extra-args support).
    perturbation: the transformation ``g -> e`` (with extra-args support).
    correction: the :class:`Correction`.
    options: the :class:`SAMOptions`.
  """

  base: optax.GradientTransformationExtraArgs
  perturbation: optax.GradientTransformationExtraArgs
  correction: corrections.Correction
  options: SAMOptions


def check_transformation(name: str, value: Any) -> None:
  """Raises ``TypeError`` naming ``name`` unless ``value`` is an Optax transformation."""
  if not isinstance(value, optax.GradientTransformation) and not (
    callable(getattr(value, 'init', None)) and callable(getattr(value, 'update', None))
  ):
    raise TypeError(
      f'{name} must be an Optax transformation (e.g. optax.sgd(0.1, momentum=0.9)), got {value!r}.'
    )


def make_spec(
  base_optimizer: Any, perturbation: Any, correction: Optional[Any], options: SAMOptions
) -> Spec:
  """The validated parts, with extra-args support, and the identity correction by default."""
  check_transformation('base_optimizer', base_optimizer)
  check_transformation('perturbation', perturbation)
  if correction is None:
    correction = corrections.no_correction()
  if not isinstance(correction, corrections.Correction):
    raise TypeError(f'correction must be a Correction (or None), got {correction!r}.')
  return Spec(
    optax.with_extra_args_support(base_optimizer),
    optax.with_extra_args_support(perturbation),
    correction,
    options,
  )
