"""The SAM wrapper's shared options, validated once, and the parts a SAM optimizer is made of."""

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import optax

from optax_sam._src import corrections, numerics, policies

_FLAGS = ('local_perturbation', 'two_phase', 'statistics', 'perturb_in_param_dtype')


@dataclasses.dataclass(frozen=True)
class SAMOptions:
  """How a SAM optimizer runs, whatever its perturbation and correction.

  Every alias takes these as keyword arguments and hands them on with
  :meth:`from_arguments`; :func:`sharpness_aware` documents each.

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

  @classmethod
  def from_arguments(cls, arguments: Mapping[str, Any], **overrides: Any) -> 'SAMOptions':
    """The options among a factory's arguments, found by their names (e.g. in ``locals()``).

    Args:
      arguments: a mapping holding (at least) the option names.
      **overrides: values that replace those in ``arguments``.

    Returns:
      The validated :class:`SAMOptions`.
    """
    values = {f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments}
    return cls(**{**values, **overrides})


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
