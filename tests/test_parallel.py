"""SAMPa: the parallel step against its authors' code, its routes, devices and contract.

``tests/official/sampa.json`` holds the official ``train.py`` run unmodified in float64 (two
threads standing for its two Fabric ranks; ``tests/official/generate.py``): five steps of SGD
with momentum and weight decay, a classification loss with label smoothing, five different
batches. The official loop takes the perturbed point's gradient on the previous batch, which
``optax_sam.batch_pair`` reproduces.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sam
from tests import helpers

DOCUMENT = json.loads((pathlib.Path(__file__).parent / 'official' / 'sampa.json').read_text())
TOLERANCE = 1e-10


def official_problem():
  """The official run's problem in float64: params, batches and ``grad(params, batch)``."""
  p = DOCUMENT['problem']
  x, labels = np.asarray(p['x']), np.asarray(p['labels'])
  params = {k: jnp.asarray(v, jnp.float64) for k, v in p['init_params'].items()}
  batches = [(jnp.asarray(x[r]), jnp.asarray(labels[r])) for r in p['batches']]

  def loss(w, batch):  # utility.smooth_crossentropy(out, labels, 0.1).mean(), up to a constant
    inputs, targets = batch
    out = jnp.tanh((inputs @ w['kernel'] + w['bias']) * w['scale'])
    smoothed = jax.nn.one_hot(targets, 3) * (0.9 - 0.05) + 0.05
    return jnp.mean(optax.softmax_cross_entropy(out, smoothed))

  return params, batches, jax.grad(loss)


def official_base(hyperparameters: dict) -> optax.GradientTransformation:
  """torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=wd): the decay enters the momentum."""
  b = DOCUMENT['base_optimizer']
  decay = optax.add_decayed_weights(hyperparameters['weight_decay'])
  return optax.chain(decay, optax.sgd(b['lr'], momentum=b['momentum']))


def run(tx, params, batches, grad, paired=True, step=None):
  """The weights after each step; ``paired``: the previous batch for the perturbed point."""
  step = step or jax.jit(
    lambda w, s, a, b: tx.update(None, s, w, grad_fn=optax_sam.batch_pair(grad, a, b))
  )
  state, out = tx.init(params), []
  for t, batch in enumerate(batches):
    previous = batches[max(t - 1, 0)] if paired else batch
    u, state = step(params, state, previous, batch)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out, state


def case_ids():
  return [c['name'] for c in DOCUMENT['cases']]


@pytest.mark.parametrize('route', ['vmap', 'sequential'])
@pytest.mark.parametrize('case', DOCUMENT['cases'], ids=case_ids())
def test_equals_the_authors_code(case, route):
  with jax.enable_x64(True):
    params, batches, grad = official_problem()
    hp = case['hyperparameters']
    tx = optax_sam.sampa(official_base(hp), rho=hp['rho'], lmbda=hp['og'], pair_route=route)
    got, _ = run(tx, params, batches, grad)
    for i, (w, step) in enumerate(zip(got, case['steps'], strict=True)):
      diff = helpers.max_diff(w, {k: np.asarray(v) for k, v in step['params'].items()})
      assert diff < TOLERANCE, f'{case["name"]}: step {i} off by {diff:.2e}'


def test_the_batch_pairing_is_what_the_official_code_does():
  """The same batch for both points is a different (also valid) trajectory, not the official."""
  with jax.enable_x64(True):
    params, batches, grad = official_problem()
    case = DOCUMENT['cases'][0]
    hp = case['hyperparameters']
    tx = optax_sam.sampa(official_base(hp), rho=hp['rho'], lmbda=hp['og'])
    same, _ = run(tx, params, batches, grad, paired=False)
    official = {k: np.asarray(v) for k, v in case['steps'][-1]['params'].items()}
    assert helpers.max_diff(same[-1], official) > 1e-6
    # A plain grad_fn(params) is the same-batch step.
    state, w = tx.init(params), params
    for batch in batches:
      u, state = tx.update(None, state, w, grad_fn=lambda p, b=batch: grad(p, b))
      w = optax.apply_updates(w, u)
    assert helpers.max_diff(w, same[-1]) < 1e-12


def hand_written(params, grad_fn, base, rho, lmbda, steps):
  """SAMPa written out: the auxiliary step from a copy of the base state, zero at step 0."""
  d = jax.tree.map(jnp.zeros_like, params)
  state, w, out = base.init(params), params, []
  for t in range(steps):
    norm = optax.tree.norm(d)
    perturbed = jax.tree.map(lambda x, v, n=norm: x + rho * v / (n + 1e-12), w, d)
    tentative, _ = base.update(d, state, w)
    auxiliary = optax.apply_updates(w, tentative) if t > 0 else w
    g1, g2 = grad_fn(perturbed), grad_fn(auxiliary)
    mixed = jax.tree.map(lambda a, b: (1 - lmbda) * a + lmbda * b, g1, g2)
    u, state = base.update(mixed, state, w)
    w, d = optax.apply_updates(w, u), g2
    out.append(w)
  return out


@pytest.mark.parametrize(
  'base',
  [optax.sgd(0.1, momentum=0.9), optax.adamw(0.01, weight_decay=0.1)],
  ids=['momentum', 'adamw'],
)
def test_equals_the_formula_written_out(base):
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.sampa(base, rho=0.2, lmbda=0.3)
  state, w = tx.init(params), params
  want = hand_written(params, grad_fn, base, 0.2, 0.3, 4)
  for i in range(4):
    u, state = tx.update(None, state, w, grad_fn=grad_fn)
    w = optax.apply_updates(w, u)
    assert helpers.max_diff(w, want[i]) < 1e-6, i


def test_rho_zero_and_lambda_zero_is_the_base_optimizer():
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax_sam.sampa(base, rho=0.0, lmbda=0.0)
  s1, s2, w1, w2 = tx.init(params), base.init(params), params, params
  for _ in range(3):
    u, s1 = tx.update(None, s1, w1, grad_fn=grad_fn)
    w1 = optax.apply_updates(w1, u)
    u, s2 = base.update(grad_fn(w2), s2, w2)
    w2 = optax.apply_updates(w2, u)
  assert helpers.max_diff(w1, w2) < 1e-7
  # lambda = 1: the step follows the auxiliary gradient alone (rho does not matter).
  a = optax_sam.sampa(base, rho=0.5, lmbda=1.0)
  b = optax_sam.sampa(base, rho=0.0, lmbda=1.0)
  sa, sb, wa, wb = a.init(params), b.init(params), params, params
  for _ in range(3):
    u, sa = a.update(None, sa, wa, grad_fn=grad_fn)
    wa = optax.apply_updates(wa, u)
    u, sb = b.update(None, sb, wb, grad_fn=grad_fn)
    wb = optax.apply_updates(wb, u)
  assert helpers.max_diff(wa, wb) < 1e-7


def test_the_vmapped_pair_calls_grad_fn_once_and_the_sequential_twice():
  params, _, grad_fn = helpers.problem()
  for route, calls in (('vmap', 1), ('sequential', 2)):
    traced = []
    tx = optax_sam.sampa(optax.sgd(0.1), pair_route=route)
    fn = lambda p, traced=traced: traced.append(jax.tree.map(jnp.shape, p)) or grad_fn(p)
    jax.jit(lambda w, s, tx=tx, fn=fn: tx.update(None, s, w, grad_fn=fn)).lower(
      params, tx.init(params)
    )
    assert len(traced) == calls, route


@pytest.mark.devices(2)
def test_two_devices_one_gradient_each_equal_one_device():
  """pmap and shard_map over a pair axis of 2, and a sharded stacked pair under jit."""
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  single = optax_sam.sampa(base, rho=0.2, lmbda=0.3)
  want, _ = run_plain(single, params, grad_fn, 3)

  tx = optax_sam.sampa(base, rho=0.2, lmbda=0.3, pair_axis_name='pair')
  step = lambda w, s: tx.update(None, s, w, grad_fn=grad_fn)
  # pmap needs one mapped argument: the devices' indices, unused.
  pmapped = jax.pmap(lambda i, w, s: step(w, s), axis_name='pair', in_axes=(0, None, None))
  first = lambda w, s: jax.tree.map(lambda a: a[0], pmapped(jnp.arange(2), w, s))
  got, _ = run_plain(tx, params, grad_fn, 3, step=first)
  assert helpers.max_diff(got, want) < 1e-6

  mesh = jax.make_mesh((2,), ('pair',), devices=jax.devices()[:2])
  mapped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P()), out_specs=(P(), P())))
  got, _ = run_plain(tx, params, grad_fn, 3, step=mapped)
  assert helpers.max_diff(got, want) < 1e-6

  auto = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('pair',))
  sharded = optax_sam.sampa(base, rho=0.2, lmbda=0.3, pair_sharding=NamedSharding(auto, P('pair')))
  got, _ = run_plain(sharded, params, grad_fn, 3)  # a sharding hint on a mesh of Auto axes
  assert helpers.max_diff(got, want) < 1e-6
  sharded = optax_sam.sampa(base, rho=0.2, lmbda=0.3, pair_sharding=NamedSharding(mesh, P('pair')))
  with jax.set_mesh(mesh):  # Explicit axes: a reshard there and back
    got, _ = run_plain(sharded, params, grad_fn, 3)
  assert helpers.max_diff(got, want) < 1e-6


def run_plain(tx, params, grad_fn, steps, step=None):
  step = step or jax.jit(lambda w, s: tx.update(None, s, w, grad_fn=grad_fn))
  state = tx.init(params)
  for _ in range(steps):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.mark.devices(4)
def test_data_parallel_axis_averages_both_gradients():
  """pmap over 4 devices, each a quarter of the batch: the whole batch's step."""
  params, loss, _ = helpers.problem()
  x, y = helpers.batch(5)
  grad = jax.grad(lambda p, x, y: loss(p, x, y))
  base = optax.sgd(0.1, momentum=0.9)
  want, _ = run_plain(optax_sam.sampa(base), params, lambda p: grad(p, x, y), 2)
  tx = optax_sam.sampa(base, axis_name='d')
  mapped = jax.pmap(
    lambda w, s, x, y: tx.update(None, s, w, grad_fn=lambda p: grad(p, x, y)),
    axis_name='d',
    in_axes=(None, None, 0, 0),
  )
  step = lambda *args: jax.tree.map(lambda a: a[0], mapped(*args))
  shards = lambda a: a.reshape(4, 4, *a.shape[1:])
  state, w = tx.init(params), params
  for _ in range(2):
    u, state = step(w, state, shards(x), shards(y))
    w = optax.apply_updates(w, u)
  assert helpers.max_diff(w, want) < 1e-6


def test_inject_hyperparams_and_bf16_params():
  params, _, grad_fn = helpers.problem()
  injected = optax.inject_hyperparams(optax_sam.sampa)(optax.sgd(0.1), rho=0.05, lmbda=0.2)
  fixed = optax_sam.sampa(optax.sgd(0.1), rho=0.05, lmbda=0.6)
  state, fixed_state, w = injected.init(params), fixed.init(params), params
  state.hyperparams['lmbda'] = jnp.asarray(0.6)
  for _ in range(2):  # the second step has an auxiliary step and a perturbation
    got, state = injected.update(None, state, w, grad_fn=grad_fn)
    want, fixed_state = fixed.update(None, fixed_state, w, grad_fn=grad_fn)
    assert helpers.max_diff(got, want) < 1e-7
    w = optax.apply_updates(w, got)

  tx = optax_sam.sampa(optax.sgd(0.1, momentum=0.9))
  helpers.assert_bf16_steps(tx, params, grad_fn)


@pytest.mark.parametrize(
  'kwargs, error, match',
  [
    ({'two_phase': True}, ValueError, 'sampa does not take two_phase'),
    ({'when': optax_sam.every(2)}, ValueError, 'sampa does not take when'),
    ({'statistics': True}, ValueError, 'sampa does not take statistics'),
    ({'lmbda': 1.5}, ValueError, 'lmbda'),
    ({'rho': -0.1}, ValueError, 'rho'),
    ({'pair_route': 'scan'}, ValueError, "pair_route must be one of \\('vmap', 'sequential'\\)"),
  ],
)
def test_clear_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_sam.sampa(optax.sgd(0.1), **kwargs)


def test_clear_errors_at_the_call():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.sampa(optax.sgd(0.1))
  with pytest.raises(TypeError, match='needs grad_fn'):
    tx.update(None, tx.init(params), params)
  with pytest.raises(ValueError, match='same structure and shapes'):
    optax_sam.batch_pair(lambda p, b: p, jnp.ones(3), jnp.ones(4))


@pytest.mark.devices(4)
def test_a_pair_axis_must_have_two_devices():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.sampa(optax.sgd(0.1), pair_axis_name='pair')
  step = jax.pmap(
    lambda i, w, s: tx.update(None, s, w, grad_fn=grad_fn),
    axis_name='pair',
    in_axes=(0, None, None),
  )
  with pytest.raises(ValueError, match='must have size 2'):
    step(jnp.arange(4), params, tx.init(params))
