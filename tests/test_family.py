"""WSAM, VaSSO, GCSAM, Unified SAM and SAM-ON, grown from parts, against their authors' code.

``tests/official/*.json`` hold trajectories of the official PyTorch files, run unmodified in float64
on one small problem (``tests/official/generate.py``; see its README). Each case here rebuilds the
problem in JAX, runs the optax_sam alias with the case's hyperparameters around SGD with momentum,
and compares every step's weights, in both calling modes. The rest of the file checks the
properties the trajectories cannot show: the special cases each method reduces to, and that each
works with ``when=``, ``micro_batches``, several devices and ``inject_hyperparams``.
"""

import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers

OFFICIAL = pathlib.Path(__file__).parent / 'official'
TOLERANCE = 1e-10


def load(method: str) -> dict:
  return json.loads((OFFICIAL / f'{method}.json').read_text())


def problem(document: dict):
  """The official runs' problem in float64: params, and the loss's gradient function."""
  p = document['problem']
  x, y = np.asarray(p['x'], np.float64), np.asarray(p['y'], np.float64)
  params = {k: jnp.asarray(v, jnp.float64) for k, v in p['init_params'].items()}

  def loss(w):
    out = jnp.tanh((x @ w['kernel'] + w['bias']) * w['scale'])
    return jnp.mean((out - y) ** 2)

  return params, jax.grad(loss)


def base(document: dict) -> optax.GradientTransformation:
  b = document['base_optimizer']
  assert b['name'] == 'torch.optim.SGD' and b['weight_decay'] == 0 and not b['nesterov']
  return optax.sgd(b['lr'], momentum=b['momentum'])


def trajectory(tx, params, grad_fn, steps: int, two_phase: bool) -> list:
  """The weights after each of ``steps`` SAM steps (clean weights in two-phase mode)."""
  state, out = tx.init(params), []
  call = jax.jit(lambda w, s, g: tx.update(g, s, w, **({} if two_phase else {'grad_fn': grad_fn})))
  for _ in range(steps):
    for _ in range(2 if two_phase else 1):
      u, state = call(params, state, grad_fn(params))
      params = optax.apply_updates(params, u)
    out.append(params)
  return out


def assert_trajectory(document: dict, case: dict, make, two_phase: bool) -> None:
  with jax.enable_x64(True):
    params, grad_fn = problem(document)
    tx = make(base(document), two_phase=two_phase)
    got = trajectory(tx, params, grad_fn, len(case['steps']), two_phase)
    for i, (step, w) in enumerate(zip(case['steps'], got, strict=True)):
      for k, want in step['params'].items():
        diff = float(np.max(np.abs(np.asarray(w[k]) - np.asarray(want))))
        assert diff < TOLERANCE, f'{case["name"]}: step {i}, {k} off by {diff:.2e}'


def cases(method: str) -> list:
  document = load(method)
  return [pytest.param(document, c, id=c['name']) for c in document['cases']]


MODES = pytest.mark.parametrize('two_phase', [False, True], ids=['one_call', 'two_phase'])


# ------------------------------------------------------------------- against the authors' code


@MODES
@pytest.mark.parametrize('document, case', cases('wsam'))
def test_wsam_equals_atorch(document, case, two_phase):
  h = dict(case['hyperparameters'])
  lr = document['base_optimizer']['lr']

  def make(b, **options):
    extra = {'learning_rate': lr} if h.get('decouple', True) else {}
    return optax_sam.wsam(b, **h, eps=1e-12, **extra, **options)

  assert_trajectory(document, case, make, two_phase)


@MODES
@pytest.mark.parametrize('document, case', cases('vasso'))
def test_vasso_equals_the_authors_code(document, case, two_phase):
  h = case['hyperparameters']
  make = lambda b, **o: optax_sam.vasso(b, rho=h['rho'], theta=h['theta'], **o)
  assert_trajectory(document, case, make, two_phase)


@MODES
@pytest.mark.parametrize('document, case', cases('gcsam'))
def test_gcsam_equals_the_authors_code(document, case, two_phase):
  h = case['hyperparameters']
  make = lambda b, **o: optax_sam.gcsam(b, rho=h['rho'], adaptive=h.get('adaptive', False), **o)
  assert_trajectory(document, case, make, two_phase)


def _unified_lmbda(value):
  """The official counter t starts at 1: with the 0-based step count c, t = c + 1."""
  t = lambda c: jnp.asarray(c, jnp.float64) + 1  # in float64, as the official Python floats
  if value == '1-1/t':
    return lambda c: 1 - 1 / t(c)
  if value == '1/t':
    return lambda c: 1 / t(c)
  return value


@MODES
@pytest.mark.parametrize('document, case', cases('unified_sam'))
def test_unified_sam_equals_the_authors_code(document, case, two_phase):
  h = case['hyperparameters']
  lmbda = _unified_lmbda(h['lambd'])
  make = lambda b, **o: optax_sam.unified_sam(b, rho=h['rho'], lmbda=lmbda, **o)
  assert_trajectory(document, case, make, two_phase)


def _sam_on_mask(h: dict):
  """SAM-ON's selection by name: only_norm perturbs ``norm.weight`` (our ``scale``)."""
  if h['only_norm']:
    return {'kernel': False, 'bias': False, 'scale': True}
  if h['no_norm']:
    return {'kernel': True, 'bias': True, 'scale': False}
  return None


@MODES
@pytest.mark.parametrize('document, case', cases('sam_on'))
def test_sam_on_equals_the_authors_code(document, case, two_phase):
  """SAM and ASAM with ``perturb_mask``; the official epsilon is 1e-16, after the square root."""
  h = case['hyperparameters']
  mask = _sam_on_mask(h)
  if case['class'] == 'SAM_ON':
    make = lambda b, **o: optax_sam.sam(b, rho=h['rho'], perturb_mask=mask, eps=1e-16, **o)
  else:
    assert h['elementwise'] and not h['layerwise'] and h['p'] == '2'
    # T = |w| + eta on the parameters named "weight" (kernel, scale), all with normalize_bias.
    every = lambda p: jax.tree.map(lambda _: True, p)
    scaled = every if h['normalize_bias'] else optax_sam.not_bias_mask
    make = lambda b, **o: optax_sam.asam(
      b, rho=h['rho'], eta=h['eta'], adaptive_mask=scaled, perturb_mask=mask, eps=1e-16, **o
    )
  assert_trajectory(document, case, make, two_phase)


@pytest.mark.parametrize('document, case', cases('lookbehind_sam'))
def test_lookbehind_sam_equals_the_authors_code(document, case):
  """One update is one official batch: k accumulated ascents and descents, then the step back."""
  h = case['hyperparameters']
  alpha = None if h['alpha'] == -1 else h['alpha']

  def make(b, two_phase):
    assert not two_phase
    return optax_sam.lookbehind_sam(
      b,
      rho=h['rho'],
      k=h['k_steps'],
      alpha=alpha,
      adaptive=case['class'] == 'LookbehindASAM',
      eta=h['eta'],
    )

  assert_trajectory(document, case, make, two_phase=False)


def test_lookbehind_sam_with_k_1_and_alpha_1_is_sam():
  params, _, grad_fn = helpers.problem()
  sgd = lambda: optax.sgd(0.1, momentum=0.9)
  want = _steps(optax_sam.sam(sgd(), rho=0.1, eps=1e-16), params, grad_fn)
  got = _steps(optax_sam.lookbehind_sam(sgd(), rho=0.1, k=1, alpha=1.0), params, grad_fn)
  assert helpers.max_diff(got, want) < 1e-6


def test_the_benchmarks_hand_written_lookbehind_step_is_the_alias_step():
  """benchmarks.run's ``ref/lookbehind`` (the cycle written out) equals ``lookbehind_sam``."""
  from types import SimpleNamespace  # noqa: PLC0415

  from benchmarks import references  # noqa: PLC0415 - the benchmarks are not the library

  params, loss, grad_fn = helpers.problem()
  model = SimpleNamespace(loss=lambda p, model_state, batch: (loss(p), model_state))
  base = optax.sgd(0.1, momentum=0.9)
  init, step = references.lookbehind_step(model, base)
  tx = optax_sam.lookbehind_sam(base, references.RHO)
  state, reference_state, w, reference_w = tx.init(params), init(params), params, params
  for _ in range(3):
    updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
    w = optax.apply_updates(w, updates)
    reference_w, reference_state, _, _ = step(reference_w, reference_state, None, None)
  assert helpers.max_diff(w, reference_w) < 1e-6
  assert helpers.max_diff(w, params) > 1e-3


def test_lookbehind_sam_refuses_what_its_shape_cannot_do():
  for options in (dict(two_phase=True), dict(statistics=True), dict(when=optax_sam.every(2))):
    with pytest.raises(ValueError, match=f'lookbehind_sam does not take {next(iter(options))}'):
      optax_sam.lookbehind_sam(optax.sgd(0.1), **options)
  params, loss, _ = helpers.problem()
  tx = optax_sam.lookbehind_sam(optax.sgd(0.1))
  groups = optax_sam.micro_batches(lambda p, b: jax.grad(loss)(p), jnp.zeros((4, 1)), 2)
  with pytest.raises(ValueError, match='takes no micro_batches'):
    tx.update(params, tx.init(params), params, grad_fn=groups)


@pytest.mark.devices(8)
def test_lookbehind_sam_on_eight_devices_equals_one():
  params, loss, _ = helpers.problem()
  x, y = helpers.batch(5)
  grad = jax.grad(lambda p, x, y: loss(p, x, y))
  make = lambda **o: optax_sam.lookbehind_sam(optax.sgd(0.1, momentum=0.9), k=3, alpha=None, **o)
  single = make()
  want, _ = single.update(
    grad(params, x, y), single.init(params), params, grad_fn=lambda p: grad(p, x, y)
  )
  tx = make(axis_name='d')

  def step(params, x, y):
    return tx.update(grad(params, x, y), tx.init(params), params, grad_fn=lambda p: grad(p, x, y))[
      0
    ]

  shards = lambda a: a.reshape(8, 2, *a.shape[1:])
  got = jax.pmap(step, axis_name='d', in_axes=(None, 0, 0))(params, shards(x), shards(y))
  assert helpers.max_diff(jax.tree.map(lambda a: a[0], got), want) < 1e-6
  local = make(axis_name='d', local_perturbation=True)

  def local_step(params, x, y):
    g = grad(params, x, y)
    return local.update(g, local.init(params), params, grad_fn=lambda p: grad(p, x, y))[0]

  got = jax.pmap(local_step, axis_name='d', in_axes=(None, 0, 0))(params, shards(x), shards(y))
  assert 1e-6 < helpers.max_diff(jax.tree.map(lambda a: a[0], got), want) < 0.1


# ------------------------------------------------------------------------------- properties


def _steps(tx, params, grad_fn, steps=3):
  return trajectory(tx, params, grad_fn, steps, False)[-1]


def test_special_cases_reduce_to_sam_and_usam():
  params, _, grad_fn = helpers.problem()
  sgd = lambda: optax.sgd(0.1, momentum=0.9)
  sam = _steps(optax_sam.sam(sgd(), rho=0.1), params, grad_fn)
  usam = _steps(optax_sam.sam(sgd(), rho=0.1, normalize=False), params, grad_fn)
  for tx, want in [
    (optax_sam.unified_sam(sgd(), rho=0.1, lmbda=1.0), sam),
    (optax_sam.unified_sam(sgd(), rho=0.1, lmbda=0.0), usam),
    (optax_sam.vasso(sgd(), rho=0.1, theta=1.0, eps=1e-12), sam),
    (optax_sam.wsam(sgd(), rho=0.1, gamma=0.5, decouple=False), sam),
    (optax_sam.sam(sgd(), rho=0.1, perturb_mask={'kernel': True, 'bias': True}), sam),
  ]:
    assert helpers.max_diff(_steps(tx, params, grad_fn), want) < 1e-6


def test_gcsam_centralizes_along_the_flax_input_axes_only():
  g = {'kernel': jnp.arange(6.0).reshape(2, 3), 'bias': jnp.array([1.0, 2.0, 3.0])}
  tx = optax_sam.centralized_ascent(rho=1.0)
  e, _ = tx.update(g, tx.init(g), g)
  norm = float(optax.tree.norm(g))
  np.testing.assert_allclose(e['kernel'] * norm, [[-1.5] * 3, [1.5] * 3], rtol=1e-6)
  np.testing.assert_allclose(e['bias'] * norm, g['bias'], rtol=1e-6)  # vectors untouched
  tx = optax_sam.centralized_ascent(rho=1.0, output_axes=0)  # PyTorch's (out, in)
  e, _ = tx.update(g, tx.init(g), g)
  np.testing.assert_allclose(e['kernel'] * norm, [[-1, 0, 1], [-1, 0, 1]], rtol=1e-6)


def test_perturb_mask_leaves_unselected_leaves_unperturbed_but_trained():
  params, _, grad_fn = helpers.problem()
  g = grad_fn(params)
  tx = optax_sam.ascent(rho=0.1, perturb_mask={'kernel': False, 'bias': True})
  e, _ = tx.update(g, tx.init(params), params)
  assert float(jnp.abs(e['kernel']).max()) == 0.0
  np.testing.assert_allclose(optax.tree.norm(e), 0.1, rtol=1e-6)  # the norm is the bias's alone
  callable_mask = lambda p: {'kernel': False, 'bias': True}
  e2, _ = optax_sam.ascent(rho=0.1, perturb_mask=callable_mask).update(g, None, params)
  assert helpers.max_diff(e, e2) == 0.0
  sam_on = optax_sam.sam(optax.sgd(0.1), rho=0.1, perturb_mask={'kernel': False, 'bias': True})
  w = _steps(sam_on, params, grad_fn, steps=1)
  assert helpers.max_diff(w['kernel'], params['kernel']) > 0  # trained with g_adv all the same


def test_wsam_decoupled_term_bypasses_the_base_optimizer():
  """Decoupled: u = base(g) - lr alpha (g_adv - g), whatever the base does with its input."""
  params, _, grad_fn = helpers.problem()
  base = optax.adam(0.01)
  tx = optax_sam.wsam(base, rho=0.1, gamma=0.8, learning_rate=0.3)
  g = grad_fn(params)
  u, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  e = optax_sam.ascent(rho=0.1).update(g, None, params)[0]
  g_adv = grad_fn(optax.apply_updates(params, e))
  want, _ = base.update(g, base.init(params), params)
  want = jax.tree.map(lambda b, a, c: b - 0.3 * 4.0 * (a - c), want, g_adv, g)
  assert helpers.max_diff(u, want) < 1e-6


def test_wsam_decoupled_learning_rate_schedule_counts_sam_steps():
  params, _, grad_fn = helpers.problem()
  schedule = lambda c: 0.1 * (c + 1.0)
  tx = optax_sam.wsam(optax.sgd(0.0), rho=0.1, gamma=0.5, learning_rate=schedule)
  state = tx.init(params)
  for step in range(3):
    g = grad_fn(params)
    u, state = tx.update(g, state, params, grad_fn=grad_fn)
    e = optax_sam.ascent(rho=0.1).update(g, None, params)[0]
    g_adv = grad_fn(optax.apply_updates(params, e))
    want = jax.tree.map(lambda a, c, s=step: -0.1 * (s + 1.0) * (a - c), g_adv, g)
    assert helpers.max_diff(u, want) < 1e-6
    params = optax.apply_updates(params, u)


def test_wsam_needs_a_learning_rate_when_decoupled():
  with pytest.raises(ValueError, match='needs learning_rate'):
    optax_sam.wsam(optax.sgd(0.1))
  with pytest.raises(ValueError, match='gamma must be below 1'):
    optax_sam.wsam(optax.sgd(0.1), gamma=1.0, decouple=False)
  optax_sam.wsam(optax.sgd(0.1), decouple=False)


FAMILY = {name: helpers.VARIANTS[name] for name in helpers.FAMILY}


@pytest.mark.parametrize('name', sorted(FAMILY))
def test_when_every_2_alternates_sam_and_plain_steps(name):
  """Steps 0 and 2 are SAM steps, step 1 is the base optimizer's on g (nothing added outside)."""
  params, _, grad_fn = helpers.problem()
  sam_like = FAMILY[name].make(optax.sgd(0.1), when=optax_sam.every(2))
  plain = optax.sgd(0.1)
  state = sam_like.init(params)
  u0, state = sam_like.update(grad_fn(params), state, params, grad_fn=grad_fn)
  w1 = optax.apply_updates(params, u0)
  u1, state = sam_like.update(grad_fn(w1), state, w1, grad_fn=grad_fn)
  want, _ = plain.update(grad_fn(w1), plain.init(w1), w1)
  assert helpers.max_diff(u1, want) < 1e-7
  assert helpers.max_diff(u0, plain.update(grad_fn(params), plain.init(params))[0]) > 1e-6


@pytest.mark.parametrize('name', sorted(FAMILY))
def test_micro_batches_with_one_group_equal_the_whole_batch(name):
  """m-sharpness with the batch as one group is the plain step, on both routes."""
  params, loss, _ = helpers.problem()
  x, y = helpers.batch(3)
  grad = jax.grad(lambda p, batch: loss(p, *batch))
  tx = FAMILY[name].make(optax.sgd(0.1, momentum=0.9))
  want, _ = tx.update(
    grad(params, (x, y)), tx.init(params), params, grad_fn=lambda p: grad(p, (x, y))
  )
  for route in ('scan', 'vmap'):
    groups = optax_sam.micro_batches(grad, (x, y), 16, route=route)
    got, _ = tx.update(None, tx.init(params), params, grad_fn=groups)
    assert helpers.max_diff(got, want) < 1e-6, route


@pytest.mark.devices(8)
@pytest.mark.parametrize('name', sorted(FAMILY))
def test_eight_devices_with_global_perturbation_equal_one(name):
  """Under pmap, gradients averaged over 8 devices: the step of the whole batch."""
  params, loss, _ = helpers.problem()
  x, y = helpers.batch(4)
  grad = jax.grad(lambda p, x, y: loss(p, x, y))
  single = FAMILY[name].make(optax.sgd(0.1, momentum=0.9))
  want, _ = single.update(
    grad(params, x, y), single.init(params), params, grad_fn=lambda p: grad(p, x, y)
  )
  shards = lambda a: a.reshape(8, 2, *a.shape[1:])
  for local in (False, True):
    tx = FAMILY[name].make(optax.sgd(0.1, momentum=0.9), axis_name='d', local_perturbation=local)

    def step(params, x, y, tx=tx):
      g = grad(params, x, y)
      return tx.update(g, tx.init(params), params, grad_fn=lambda p: grad(p, x, y))[0]

    got = jax.pmap(step, axis_name='d', in_axes=(None, 0, 0))(params, shards(x), shards(y))
    got = jax.tree.map(lambda a: a[0], got)
    if local:  # each device perturbs with its own gradient: a different, finite step
      assert 1e-6 < helpers.max_diff(got, want) < 0.1
    else:
      assert helpers.max_diff(got, want) < 1e-6


@pytest.mark.parametrize(
  'factory, name, value',
  [
    (functools.partial(optax_sam.wsam, optax.sgd(0.1), learning_rate=0.1), 'rho', 0.2),
    (functools.partial(optax_sam.wsam, optax.sgd(0.1), decouple=False), 'gamma', 0.7),
    (functools.partial(optax_sam.vasso, optax.sgd(0.1)), 'theta', 0.3),
    (functools.partial(optax_sam.unified_sam, optax.sgd(0.1)), 'lmbda', 0.3),
    (functools.partial(optax_sam.gcsam, optax.sgd(0.1)), 'rho', 0.2),
  ],
  ids=['wsam-rho', 'wsam-gamma', 'vasso-theta', 'unified-lmbda', 'gcsam-rho'],
)
def test_inject_hyperparams_changes_the_step_as_the_fixed_value_does(factory, name, value):
  params, _, grad_fn = helpers.problem()
  injected = optax.inject_hyperparams(factory)(**{name: 0.05})
  state = injected.init(params)
  state.hyperparams[name] = jnp.asarray(value)
  got, _ = injected.update(grad_fn(params), state, params, grad_fn=grad_fn)
  fixed = factory(**{name: value})
  want, _ = fixed.update(grad_fn(params), fixed.init(params), params, grad_fn=grad_fn)
  assert helpers.max_diff(got, want) < 1e-6


def test_the_blocks_of_docs_family_md_run():
  text = (pathlib.Path(__file__).parent.parent / 'docs' / 'family.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.DOTALL)
  assert len(blocks) == 5
  namespace = {'__name__': 'docs_family_md'}
  for block in blocks:
    exec(compile(block, 'docs/family.md', 'exec'), namespace)  # the blocks assert their results
