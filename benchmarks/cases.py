"""The benchmarked train steps: base optimizer, minimal SAM, optax_sam, optax.contrib.sam.

Every case is a full train step ``step(params, opt_state, model_state, batch)
-> (params, opt_state, model_state, loss)`` (clean loss and gradient inside),
jitted with ``params``, ``opt_state`` and ``model_state`` donated, as a
training loop would. A case whose SAM step takes two calls (two-phase mode,
``optax.contrib.sam`` in transparent mode) has ``calls_per_step=2``: one SAM
step is two calls of the same compiled step.
"""

from collections.abc import Callable
from typing import NamedTuple, Optional

import jax
import optax
from optax import contrib

import optax_sam
from benchmarks import references
from benchmarks.models import Model

LEARNING_RATE = 0.1
assert references.LEARNING_RATE == LEARNING_RATE  # WSAM's hand-written decoupled term
MOMENTUM = 0.9
RHO = 0.05
EPS = 1e-12
INT32_BYTES = 4
FLOAT32_BYTES = 4
BSAM_DATA_SIZE = references.BSAM_DATA_SIZE  # bSAM's N: CIFAR-10's training set


def base_optimizer() -> optax.GradientTransformation:
  """The base optimizer of every case: SGD with momentum (one parameter-sized buffer)."""
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


BASE_OPTIMIZER_NAME = f'optax.sgd({LEARNING_RATE}, momentum={MOMENTUM})'


class Variant(NamedTuple):
  """An optax_sam variant and the extra state its documentation promises.

  Attributes:
    name: short name used in tables.
    build: ``build(base, two_phase) -> transformation``.
    call: the factory call, for the docs.
    ema_state: carries one parameter-sized buffer and a step count (F-SAM's and VaSSO's EMA,
      SAMPa's direction d).
    prepared: what two-phase mode keeps from the clean pass besides the
      weights: ``'none'``, ``'norm'`` (a float32 scalar) or ``'gradient'``.
    two_phase: whether the variant has a two-phase mode (Lookbehind-SAM's
      cycle of inner steps has none).
    key_state: carries a PRNG key (m-RWP's noise: two uint32).
    fisher_state: carries a float32 buffer of the parameters' size (m-ARWP's F, bSAM's
      precision).
    scalar_state: float32 or int32 scalars it carries besides (bSAM's step count and N).
  """

  name: str
  build: Callable[[optax.GradientTransformation, bool], optax.GradientTransformation]
  call: str
  ema_state: bool
  prepared: str
  two_phase: bool = True
  key_state: bool = False
  fisher_state: bool = False
  scalar_state: int = 0


VARIANTS = (
  Variant(
    'sam',
    lambda b, tp: optax_sam.sam(b, RHO, two_phase=tp),
    f'sam(base, rho={RHO})',
    False,
    'none',
  ),
  Variant(
    'usam',
    lambda b, tp: optax_sam.sam(b, RHO, normalize=False, two_phase=tp),
    f'sam(base, rho={RHO}, normalize=False)',
    False,
    'none',
  ),
  Variant('asam', lambda b, tp: optax_sam.asam(b, two_phase=tp), 'asam(base)', False, 'none'),
  Variant(
    'fsam',
    lambda b, tp: optax_sam.friendly_sam(b, two_phase=tp),
    'friendly_sam(base)',
    True,
    'none',
  ),
  Variant(
    'stablesam',
    lambda b, tp: optax_sam.stable_sam(b, two_phase=tp),
    'stable_sam(base)',
    False,
    'norm',
  ),
  Variant('gsam', lambda b, tp: optax_sam.gsam(b, two_phase=tp), 'gsam(base)', False, 'gradient'),
  Variant(
    'fsam+stable',
    lambda b, tp: optax_sam.friendly_sam(b, stable=True, two_phase=tp),
    'friendly_sam(base, stable=True)',
    True,
    'norm',
  ),
  Variant(
    'wsam',
    lambda b, tp: optax_sam.wsam(b, learning_rate=LEARNING_RATE, two_phase=tp),
    f'wsam(base, learning_rate={LEARNING_RATE})',
    False,
    'gradient',
  ),
  Variant('vasso', lambda b, tp: optax_sam.vasso(b, two_phase=tp), 'vasso(base)', True, 'none'),
  Variant('gcsam', lambda b, tp: optax_sam.gcsam(b, two_phase=tp), 'gcsam(base)', False, 'none'),
  Variant(
    'lookbehind',
    lambda b, tp: optax_sam.lookbehind_sam(b, RHO),
    f'lookbehind_sam(base, {RHO}) (k = 5 gradients per step)',
    False,
    'none',
    two_phase=False,
  ),
  Variant(
    'unifiedsam',
    lambda b, tp: optax_sam.unified_sam(b, two_phase=tp),
    'unified_sam(base)',
    False,
    'none',
  ),
  Variant(
    'sampa',
    lambda b, tp: optax_sam.sampa(b),
    'sampa(base) (its two gradients in one vmap; the clean gradient unused)',
    True,
    'none',
    two_phase=False,
  ),
  Variant(
    'mrwp',
    lambda b, tp: optax_sam.mrwp(b, two_phase=tp),
    'mrwp(base) (random noise of scale sigma = 0.01 per filter; the gradients mixed 1:1)',
    False,
    'gradient',
    key_state=True,
  ),
  Variant(
    'marwp',
    lambda b, tp: optax_sam.marwp(b, two_phase=tp),
    'marwp(base) (m-RWP, the noise divided by sqrt(1 + F_i); F the sum of squared g_adv)',
    False,
    'gradient',
    key_state=True,
    fisher_state=True,
  ),
  Variant(
    'bsam',
    lambda b, tp: optax_sam.bsam(LEARNING_RATE, data_size=BSAM_DATA_SIZE),
    f'bsam({LEARNING_RATE}, data_size={BSAM_DATA_SIZE:g}) (its own optimizer: the momentum '
    'over the precision, no base; the clean gradient at a posterior sample)',
    False,  # its momentum is in place of the base optimizer's
    'none',
    two_phase=False,
    key_state=True,
    fisher_state=True,
    scalar_state=2,  # the step count and N
  ),
)


def documented_state_bytes(variant: Variant, two_phase: bool, param_bytes: int) -> int:
  """The bytes of state a variant adds to the base optimizer's, from its documentation.

  One-call mode: F-SAM's EMA and step count, m-RWP's key (two uint32),
  m-ARWP's F (float32, the parameters' size), nothing otherwise; bSAM's key,
  precision (as m-ARWP's F), step count and N (its momentum takes the place of
  the base optimizer's). Two-phase
  mode adds a copy of the weights, the correction's prepared value and the
  int32 phase flag.
  """
  extra = param_bytes + INT32_BYTES if variant.ema_state else 0
  extra += 2 * INT32_BYTES if variant.key_state else 0
  extra += param_bytes if variant.fisher_state else 0  # float32 parameters in the benchmarks
  extra += FLOAT32_BYTES * variant.scalar_state
  if two_phase:
    prepared = {'none': 0, 'norm': FLOAT32_BYTES, 'gradient': param_bytes}[variant.prepared]
    extra += param_bytes + prepared + INT32_BYTES
  return extra


class Case(NamedTuple):
  """One benchmarked train step.

  Attributes:
    name: e.g. ``sam/1call``, ``gsam/2phase``, ``contrib/opaque``, ``ref/gsam``.
    kind: ``base``, ``minimal``, ``optax_sam``, ``contrib`` or ``reference``
      (a hand-written step with one variant's math, :mod:`benchmarks.references`).
    variant: the optax_sam variant name (``None`` for the others).
    mode: ``1call`` or ``2phase`` (``contrib``: ``opaque``/``transparent``).
    calls_per_step: calls of ``step`` per SAM step.
    init: ``init(params) -> opt_state``.
    step: the (unjitted) train step.
    expected_state_bytes: documented extra state over the minimal step
      (``None`` where nothing is documented).
  """

  name: str
  kind: str
  variant: Optional[str]
  mode: str
  calls_per_step: int
  init: Callable
  step: Callable
  expected_state_bytes: Optional[int]


def _grad_fns(model: Model):
  value_and_grad = jax.value_and_grad(model.loss, has_aux=True)

  def grad_only(params, model_state, batch):
    return jax.grad(model.loss, has_aux=True)(params, model_state, batch)[0]

  return value_and_grad, grad_only


def _plain_step(model: Model, tx: optax.GradientTransformation):
  """Gradient, update, apply: the base optimizer, two-phase SAM, contrib's transparent mode."""
  value_and_grad, _ = _grad_fns(model)

  def step(params, opt_state, model_state, batch):
    (loss, new_model_state), grads = value_and_grad(params, model_state, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_model_state, loss

  return step


def _minimal_sam_step(model: Model, base: optax.GradientTransformation):
  """The practical limit: two gradients, one normalization, one base update, nothing else."""
  value_and_grad, grad_only = _grad_fns(model)

  def step(params, opt_state, model_state, batch):
    (loss, new_model_state), grads = value_and_grad(params, model_state, batch)
    scale = RHO / (optax.tree.norm(grads) + EPS)
    perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
    adv_grads = grad_only(perturbed, model_state, batch)
    updates, opt_state = base.update(adv_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_model_state, loss

  return step


def _one_call_step(model: Model, tx: optax.GradientTransformation, contrib_signature: bool):
  """One call per SAM step: the transformation calls ``grad_fn`` at the perturbed weights."""
  value_and_grad, grad_only = _grad_fns(model)

  def step(params, opt_state, model_state, batch):
    (loss, new_model_state), grads = value_and_grad(params, model_state, batch)
    if contrib_signature:  # optax.contrib.sam's grad_fn also takes the adversarial step index
      grad_fn = lambda p, _: grad_only(p, model_state, batch)
    else:
      grad_fn = lambda p: grad_only(p, model_state, batch)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, new_model_state, loss

  return step


def _contrib_sam(base: optax.GradientTransformation, opaque: bool):
  """optax.contrib.sam with the same math as SAM: one normalized ascent of radius RHO."""
  adversarial = optax.chain(contrib.normalize(), optax.sgd(RHO))
  return contrib.sam(base, adversarial, sync_period=2, opaque_mode=opaque)


def build_cases(
  model: Model, param_bytes: int, only: Optional[set] = None, with_references: bool = True
) -> list:
  """All cases for ``model`` (or those named in ``only``), in a fixed order.

  ``with_references`` adds the hand-written one-call step of each variant's
  math (``ref/<variant>``; SAM's is ``minimal``).
  """
  base = base_optimizer()
  cases = [
    Case('base', 'base', None, '-', 1, base.init, _plain_step(model, base), None),
    Case('minimal', 'minimal', None, '1call', 1, base.init, _minimal_sam_step(model, base), 0),
  ]
  for two_phase in (False, True):
    mode = '2phase' if two_phase else '1call'
    for v in VARIANTS:
      if two_phase and not v.two_phase:
        continue
      tx = v.build(base, two_phase)
      step = _plain_step(model, tx) if two_phase else _one_call_step(model, tx, False)
      expected = documented_state_bytes(v, two_phase, param_bytes)
      cases.append(
        Case(
          f'{v.name}/{mode}',
          'optax_sam',
          v.name,
          mode,
          2 if two_phase else 1,
          tx.init,
          step,
          expected,
        )
      )
  opaque = _contrib_sam(base, opaque=True)
  transparent = _contrib_sam(base, opaque=False)
  cases += [
    Case(
      'contrib/opaque',
      'contrib',
      None,
      'opaque',
      1,
      opaque.init,
      _one_call_step(model, opaque, True),
      None,
    ),
    Case(
      'contrib/transparent',
      'contrib',
      None,
      'transparent',
      2,
      transparent.init,
      _plain_step(model, transparent),
      None,
    ),
  ]
  if with_references:
    for v in VARIANTS:
      if v.name in references.MATH:
        init, step = references.reference_step(model, base, references.MATH[v.name])
      elif v.name in references.STEPS:
        init, step = references.STEPS[v.name](model, base)
      else:
        continue
      expected = documented_state_bytes(v, False, param_bytes)
      cases.append(Case(f'ref/{v.name}', 'reference', v.name, '1call', 1, init, step, expected))
  if only is not None:
    cases = [c for c in cases if c.name in only]
  return cases
