"""Every hyperparameter of every public factory is checked at construction, in one wording.

A real number is a Python or NumPy number (not a string, not a bool), finite, in its range;
an integer is not a float; a flag is True or False; ``when`` is a Policy and ``base_optimizer``
an Optax transformation. Each error names the parameter and the value received.
"""

import math

import numpy as np
import optax
import pytest

import optax_sam

NONNEGATIVE = 'nonnegative'  # a finite real number >= 0
UNIT = 'unit'  # a finite real number in [0, 1]
REAL = 'real'  # any finite real number
POSITIVE_INT = 'positive integer'
NONNEGATIVE_INT = 'nonnegative integer'
FLAG = 'flag'
UNIT_OPEN = 'unit, 1 excluded'  # a finite real number in [0, 1)
POSITIVE = 'positive'  # a finite real number > 0

BAD = {
  NONNEGATIVE: ['0.05', True, math.inf, math.nan, -0.1, [0.1]],
  UNIT: ['0.5', False, math.nan, -0.1, 1.5],
  REAL: ['1', True, math.inf, -math.inf, math.nan],
  POSITIVE_INT: [0, 2.5, True, '3', np.float32(2.0)],
  NONNEGATIVE_INT: [-1, 2.5, False, '3'],
  FLAG: ['yes', 1, None],
  UNIT_OPEN: ['0.5', True, math.nan, -0.1, 1.0],
  POSITIVE: ['1', True, math.inf, 0.0, -1.0],
}
GOOD = {
  NONNEGATIVE: [0, 0.3, np.float32(0.1), np.int64(2)],
  UNIT: [0, 1, 0.5, np.float64(0.25)],
  REAL: [-2, 0.5],
  POSITIVE_INT: [1, np.int32(3)],
  NONNEGATIVE_INT: [0, 7],
  FLAG: [True, False, np.bool_(True)],
  UNIT_OPEN: [0, 0.5, 0.99],
  POSITIVE: [0.5, 2],
}

sgd = lambda: optax.sgd(0.1, momentum=0.9)
OPTIONS = dict(
  local_perturbation=FLAG, two_phase=FLAG, statistics=FLAG, perturb_in_param_dtype=FLAG
)

# factory (called with its required arguments first) -> {parameter: kind}
FACTORIES = {
  'sam': (
    lambda **k: optax_sam.sam(sgd(), **k),
    dict(rho=NONNEGATIVE, eta=NONNEGATIVE, eps=NONNEGATIVE, normalize=FLAG, adaptive=FLAG)
    | dict(stable=FLAG, **OPTIONS),
  ),
  'asam': (
    lambda **k: optax_sam.asam(sgd(), **k),
    dict(rho=NONNEGATIVE, eta=NONNEGATIVE, eps=NONNEGATIVE, normalize=FLAG, stable=FLAG),
  ),
  'friendly_sam': (
    lambda **k: optax_sam.friendly_sam(sgd(), **k),
    dict(rho=NONNEGATIVE, sigma=UNIT, lmbda=UNIT, eta=NONNEGATIVE, eps=NONNEGATIVE)
    | dict(normalize=FLAG, adaptive=FLAG, stable=FLAG, **OPTIONS),
  ),
  'stable_sam': (
    lambda **k: optax_sam.stable_sam(sgd(), **k),
    dict(rho=NONNEGATIVE, eta=NONNEGATIVE, eps=NONNEGATIVE, normalize=FLAG, adaptive=FLAG),
  ),
  'gsam': (
    lambda **k: optax_sam.gsam(sgd(), **k),
    dict(rho=NONNEGATIVE, alpha=NONNEGATIVE, eps=NONNEGATIVE, **OPTIONS),
  ),
  'look_sam': (
    lambda **k: optax_sam.look_sam(sgd(), **k),
    dict(rho=NONNEGATIVE, alpha=NONNEGATIVE, k=POSITIVE_INT, eps=NONNEGATIVE, **OPTIONS),
  ),
  'momentum_sam': (
    lambda **k: optax_sam.momentum_sam(sgd(), **k),
    dict(rho=NONNEGATIVE, eps=NONNEGATIVE),
  ),
  'ascent': (
    optax_sam.ascent,
    dict(rho=NONNEGATIVE, eta=NONNEGATIVE, eps=NONNEGATIVE, normalize=FLAG, adaptive=FLAG),
  ),
  'friendly_direction': (optax_sam.friendly_direction, dict(sigma=UNIT, lmbda=UNIT)),
  'stable_correction': (
    optax_sam.stable_correction,
    dict(eta=NONNEGATIVE, eps=NONNEGATIVE, adaptive=FLAG),
  ),
  'gsam_correction': (optax_sam.gsam_correction, dict(alpha=NONNEGATIVE, eps=NONNEGATIVE)),
  'look_sam_correction': (
    optax_sam.look_sam_correction,
    dict(alpha=NONNEGATIVE, eps=NONNEGATIVE),
  ),
  'every': (optax_sam.every, dict(k=POSITIVE_INT)),
  'after': (optax_sam.after, dict(n=NONNEGATIVE_INT)),
  'randomly': (lambda **k: optax_sam.randomly(**{'p': 0.5, 'seed': 0, **k}), dict(p=UNIT)),
  'ae_sam': (
    lambda **k: optax_sam.ae_sam(**{'total_steps': 10, **k}),
    dict(total_steps=POSITIVE_INT, delta=UNIT, lambda1=REAL, lambda2=REAL),
  ),
  'wsam': (
    lambda **k: optax_sam.wsam(sgd(), **{'learning_rate': 0.1, **k}),
    dict(rho=NONNEGATIVE, gamma=UNIT_OPEN, learning_rate=NONNEGATIVE, max_norm=POSITIVE)
    | dict(decouple=FLAG, adaptive=FLAG, eps=NONNEGATIVE, **OPTIONS),
  ),
  'vasso': (
    lambda **k: optax_sam.vasso(sgd(), **k),
    dict(rho=NONNEGATIVE, theta=UNIT, eta=NONNEGATIVE, eps=NONNEGATIVE, adaptive=FLAG, **OPTIONS),
  ),
  'gcsam': (
    lambda **k: optax_sam.gcsam(sgd(), **k),
    dict(rho=NONNEGATIVE, eps=NONNEGATIVE, adaptive=FLAG, **OPTIONS),
  ),
  'unified_sam': (
    lambda **k: optax_sam.unified_sam(sgd(), **k),
    dict(rho=NONNEGATIVE, lmbda=UNIT, eta=NONNEGATIVE, eps=NONNEGATIVE, adaptive=FLAG, **OPTIONS),
  ),
  'unified_ascent': (optax_sam.unified_ascent, dict(rho=NONNEGATIVE, lmbda=UNIT, eps=NONNEGATIVE)),
  'vasso_direction': (optax_sam.vasso_direction, dict(theta=UNIT)),
  'centralized_ascent': (
    optax_sam.centralized_ascent,
    dict(rho=NONNEGATIVE, eps=NONNEGATIVE, adaptive=FLAG),
  ),
  'mixed_correction': (optax_sam.mixed_correction, dict(weight=NONNEGATIVE, max_norm=POSITIVE)),
  'decoupled_correction': (
    lambda **k: optax_sam.decoupled_correction(**{'weight': 1.0, 'learning_rate': 0.1, **k}),
    dict(weight=NONNEGATIVE, learning_rate=NONNEGATIVE, max_norm=POSITIVE),
  ),
  'skip_nonfinite': (
    lambda **k: optax_sam.skip_nonfinite(optax_sam.sam(sgd()), **k),
    dict(max_consecutive_skips=POSITIVE_INT),
  ),
  'sharpness_aware': (
    lambda **k: optax_sam.sharpness_aware(sgd(), optax_sam.ascent(), **k),
    dict(OPTIONS),
  ),
}

CASES = [
  pytest.param(factory, name, kind, value, id=f'{factory}-{name}={value!r}')
  for factory, (_, parameters) in FACTORIES.items()
  for name, kind in parameters.items()
  for value in BAD[kind]
]


@pytest.mark.parametrize('factory, name, kind, value', CASES)
def test_a_bad_value_is_refused_at_construction_naming_the_parameter_and_the_value(
  factory, name, kind, value
):
  make = FACTORIES[factory][0]
  with pytest.raises((ValueError, TypeError)) as raised:
    make(**{name: value})
  message = str(raised.value)
  assert name in message, message
  shown = {repr(value), str(value)}
  if isinstance(value, (int, float, np.number)):
    shown.add(str(float(value)))
  assert any(s in message for s in shown), message


@pytest.mark.parametrize('factory', FACTORIES)
def test_good_values_are_accepted(factory):
  make, parameters = FACTORIES[factory]
  for name, kind in parameters.items():
    if kind == FLAG and name == 'local_perturbation':
      continue  # needs axis_name
    for value in GOOD[kind]:
      make(**{name: value})


def test_when_must_be_a_policy_and_the_error_lists_them():
  with pytest.raises(TypeError, match=r'when must be a Policy: optax_sam.every\(k\).*got 5'):
    optax_sam.friendly_sam(sgd(), when=5)


@pytest.mark.parametrize('alias', ['sam', 'asam', 'friendly_sam', 'stable_sam', 'gsam', 'look_sam'])
def test_the_base_must_be_an_optax_transformation(alias):
  with pytest.raises(TypeError, match=r'base_optimizer must be an Optax transformation.*got 0.1'):
    getattr(optax_sam, alias)(0.1)


def test_schedules_and_jax_scalars_stay_accepted():
  import jax.numpy as jnp

  optax_sam.sam(sgd(), rho=optax.linear_schedule(0.0, 0.1, 10))
  optax_sam.friendly_sam(sgd(), rho=jnp.float32(0.05), sigma=jnp.asarray(0.5))
  optax.inject_hyperparams(optax_sam.sam)(sgd(), rho=0.05, two_phase=True)
