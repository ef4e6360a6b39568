"""Micro-batches: m-sharpness that depends on m alone, and SAM with gradient accumulation.

The problem and the float64 reference are tests/test_distributed.py's: 16
examples, and a per-device reference in which each of 8 devices perturbs with
its own 2 examples, i.e. m-sharpness with m = 2. Here the same groups are made
by :func:`optax_sam.micro_batches` on one device, on 2 devices x 4 groups, and
compared with that reference, with 8 devices under ``local_perturbation=True``
and with each other (scan against vmap).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import optax_sam
import optax_sam.flax
from tests import test_distributed as td

M = td.PER_DEVICE  # 2 examples per group: the reference's per-device m-sharpness
ROUTES = ('scan', 'vmap')


def _group_grad(params, batch):
  return jax.grad(td._loss)(params, *batch)


def _grouped_step(tx, route, m=M, **update_extra):
  def step(params, state, x, y):
    groups = optax_sam.micro_batches(_group_grad, (x, y), m, route=route)
    updates, state = tx.update(None, state, params, grad_fn=groups, **update_extra)
    return optax.apply_updates(params, updates), state

  return step


def _train(step, tx, steps=td.STEPS, x=td.X, y=td.Y):
  params, state = td.PARAMS, tx.init(td.PARAMS)
  step = jax.jit(step)
  for _ in range(steps):
    params, state = step(params, state, x, y)
  return params, state


@functools.cache
def _one_device(name, route):
  tx = td.VARIANTS[name][0]()
  return _train(_grouped_step(tx, route), tx)


@functools.cache
def _two_devices(name, route):
  """2 devices, 4 groups each; params and state carried per device (check_vma=False)."""
  tx = td.VARIANTS[name][0](axis_name=td.AXIS)
  step = _grouped_step(tx, route)

  def body(params, state, x, y):
    squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
    return td._per_device(step(squeeze(params), squeeze(state), x, y))

  mesh = td._mesh((2,))
  fn = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=P(td.AXIS), out_specs=P(td.AXIS), check_vma=False)
  )
  rep = lambda t: jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (2, *np.shape(a))), t)
  params, state = (
    td._put(rep(td.PARAMS), mesh, P(td.AXIS)),
    td._put(rep(tx.init(td.PARAMS)), mesh, P(td.AXIS)),
  )
  x, y = td._put(td.X, mesh, P(td.AXIS)), td._put(td.Y, mesh, P(td.AXIS))
  for _ in range(td.STEPS):
    params, state = fn(params, state, x, y)
  for leaf in jax.tree.leaves((params, state)):
    np.testing.assert_array_equal(np.asarray(leaf)[1], np.asarray(leaf)[0])
  return td._first(params), td._first(state)


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('name', td.VARIANTS)
def test_one_device_groups_equal_the_per_device_reference(name, route):
  params, _ = _one_device(name, route)
  td._assert_close(params, td._reference(name, local=True), tol=3e-6)


@pytest.mark.devices(8)
@pytest.mark.parametrize('name', td.VARIANTS)
def test_eight_devices_one_device_and_two_devices_take_the_same_step(name):
  """8 devices (local_perturbation=True), 1 device x 8 groups, 2 devices x 4 groups."""
  pmap_params, pmap_state, _ = td._run_pmap(name, two_phase=False, local=True)
  expected = (td._first(pmap_params), td._first(pmap_state))
  for route in ROUTES:
    td._assert_close(_one_device(name, route), expected, tol=3e-6)
  td._assert_close(_two_devices(name, 'scan'), expected, tol=3e-6)


@pytest.mark.devices(2)
def test_two_devices_vmap_route_composes_with_the_device_axis():
  expected = _one_device('fsam+stable', 'scan')
  td._assert_close(_two_devices('fsam+stable', 'vmap'), expected, tol=3e-6)


@pytest.mark.parametrize('route', ROUTES)
def test_one_group_is_the_plain_step(route):
  """m = B: one group, the ordinary one-call step (F-SAM's EMA and GSAM's correction too)."""
  for name in ('fsam', 'gsam'):
    tx = td.VARIANTS[name][0]()
    expected = _train(td._train_step(tx, False), tx)
    td._assert_close(_train(_grouped_step(tx, route, m=len(td.X)), tx), expected)


def test_group_size_one_is_per_example_sam_on_linear_regression():
  """m = 1 on least squares by hand: e_i = rho g_i / |g_i| with g_i = 2 (x_i.w - y_i) x_i."""
  rng = np.random.default_rng(0)
  x, y, w = rng.normal(size=(6, 3)), rng.normal(size=6), rng.normal(size=3)
  rho, lr = 0.2, 0.1
  loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  tx = optax_sam.sam(optax.sgd(lr), rho=rho)
  groups = optax_sam.micro_batches(jax.grad(loss), (x.astype(np.float32), y.astype(np.float32)), 1)
  u, _ = tx.update(
    None, tx.init(jnp.asarray(w, jnp.float32)), jnp.asarray(w, jnp.float32), grad_fn=groups
  )
  g_sam = np.zeros(3)
  for xi, yi in zip(x, y, strict=True):
    g = 2 * (xi @ w - yi) * xi
    w_adv = w + rho * g / np.linalg.norm(g)
    g_sam += 2 * (xi @ w_adv - yi) * xi / len(x)
  np.testing.assert_allclose(np.asarray(u), -lr * g_sam, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
  'make',
  [
    lambda: optax_sam.look_sam(td._base(), rho=0.1, alpha=0.7, k=2, statistics=True),
    lambda: optax_sam.friendly_sam(td._base(), rho=0.1, when=optax_sam.every(2), statistics=True),
    lambda: optax_sam.gsam(td._base(), rho=0.1, when=optax_sam.randomly(0.5, seed=1)),
  ],
  ids=['look_sam', 'fsam_every2_statistics', 'gsam_randomly'],
)
def test_scan_equals_vmap_with_policies_memory_and_statistics(make):
  tx = make()
  scan = _train(_grouped_step(tx, 'scan'), tx, steps=4)
  vmap = _train(_grouped_step(tx, 'vmap'), tx, steps=4)
  td._assert_close(scan, vmap, tol=3e-6)


def test_a_policy_that_reads_the_gradient_works_on_the_vmap_route_only():
  tx = optax_sam.sam(td._base(), rho=0.1, when=optax_sam.ae_sam(total_steps=10))
  _train(_grouped_step(tx, 'vmap'), tx, steps=2)
  with pytest.raises(ValueError, match="ae_sam does.*route='vmap'"):
    _train(_grouped_step(tx, 'scan'), tx, steps=1)


def test_bad_input_gives_clear_errors():
  batch = (td.X, td.Y)
  with pytest.raises(ValueError, match='group_size=3 must divide the batch size 16'):
    optax_sam.micro_batches(_group_grad, batch, 3)
  for bad in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match='group_size must be an integer >= 1'):
      optax_sam.micro_batches(_group_grad, batch, bad)
  with pytest.raises(ValueError, match="route must be one of \\('scan', 'vmap'\\)"):
    optax_sam.micro_batches(_group_grad, batch, 2, route='loop')
  with pytest.raises(ValueError, match='same size'):
    optax_sam.micro_batches(_group_grad, (td.X, td.Y[:8]), 2)
  with pytest.raises(ValueError, match='micro_batch_size=5 must divide'):
    optax_sam.accumulated_grad_fn(_group_grad, batch, 5)
  tx = optax_sam.sam(td._base(), two_phase=True)
  groups = optax_sam.micro_batches(_group_grad, batch, 2)
  with pytest.raises(ValueError, match='micro_batches needs one-call mode'):
    tx.update(None, tx.init(td.PARAMS), td.PARAMS, grad_fn=groups)
  tx = optax_sam.momentum_sam(td._base(), rho=0.1)
  with pytest.raises(ValueError, match='momentum_sam takes no second gradient'):
    tx.update(td.PARAMS, tx.init(td.PARAMS), td.PARAMS, grad_fn=groups)


def _mlp_problem(num_groups, m=4, width=64):
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
    'w1': jax.random.normal(k1, (32, width)) / 6,
    'w2': jax.random.normal(k2, (width, 10)) / 8,
  }
  x = jnp.ones((num_groups * m, 32))
  y = jnp.zeros((num_groups * m,), jnp.int32)

  def loss(p, batch):
    logits = jnp.tanh(batch[0] @ p['w1']) @ p['w2']
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  return params, (x, y), jax.grad(loss)


def _temp_bytes(route, num_groups):
  params, batch, grad = _mlp_problem(num_groups)
  tx = optax_sam.friendly_sam(optax.adam(1e-3), rho=0.05)

  def step(params, state, batch):
    groups = optax_sam.micro_batches(grad, batch, 4, route=route)
    return tx.update(None, state, params, grad_fn=groups)

  compiled = jax.jit(step).lower(params, tx.init(params), batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_scan_route_memory_is_flat_in_the_number_of_groups():
  scan_8, scan_32 = _temp_bytes('scan', 8), _temp_bytes('scan', 32)
  vmap_8, vmap_32 = _temp_bytes('vmap', 8), _temp_bytes('vmap', 32)
  assert scan_32 <= scan_8 * 1.05 + 1024, (scan_8, scan_32)
  assert vmap_32 > 2 * vmap_8, (vmap_8, vmap_32)  # the vmap route holds every group's activations


# ------------------------------------------------------------------------------ BatchNorm


class _BatchNormNet(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.norm(self.linear(x))))


def test_batchnorm_each_group_normalizes_with_its_own_statistics():
  """The documented choice: in train mode a group is normalized over its own m examples.

  The grouped step equals a loop written by hand over the groups, each with
  the train-mode loss of its own examples, and leaves the model's running
  statistics untouched (the caller's clean pass updates them).
  """
  model = _BatchNormNet(nnx.Rngs(0))
  loss = lambda model, batch: jnp.mean((model(batch[0]) - batch[1]) ** 2)
  loss_fn, params = optax_sam.flax.nnx_loss_fn(loss, model, train=True)
  grad = jax.jit(jax.grad(loss_fn))
  batch = (td.X, td.Y)
  rho, lr, m = 0.1, 0.1, 4
  tx = optax_sam.sam(optax.sgd(lr), rho=rho)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  results = {}
  for route in ROUTES:

    def step(p, s, route=route):
      return tx.update(None, s, p, grad_fn=optax_sam.micro_batches(grad, batch, m, route=route))

    results[route], _ = jax.jit(step)(params, tx.init(params))
  g_sam = []
  for j in range(len(td.X) // m):
    group = (td.X[j * m : (j + 1) * m], td.Y[j * m : (j + 1) * m])
    g = grad(params, group)
    e = optax.tree.scale(rho / optax.tree.norm(g), g)
    g_sam.append(grad(optax.apply_updates(params, e), group))
  expected = jax.tree.map(lambda *gs: -lr * sum(gs) / len(gs), *g_sam)
  for route in ROUTES:
    td._assert_close(results[route], expected, tol=2e-6)
  full, _ = tx.update(
    grad(params, batch), tx.init(params), params, grad_fn=lambda p: grad(p, batch)
  )
  assert td._max_diff(results['scan'], full) > 1e-4  # the batch's statistics would differ
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, after, before)


# ------------------------------------------------------------------- gradient accumulation

K = 4  # micro-batches of 4 examples


def test_accumulated_gradient_equals_the_whole_batch_gradient():
  acc = optax_sam.accumulated_grad_fn(_group_grad, (td.X, td.Y), len(td.X) // K)
  td._assert_close(jax.jit(acc)(td.PARAMS), _group_grad(td.PARAMS, (td.X, td.Y)), tol=1e-7)


@pytest.mark.parametrize('name', ['fsam', 'gsam', 'asam+stable'])
def test_accumulation_with_one_perturbation_equals_sam_on_the_whole_batch(name):
  tx = td.VARIANTS[name][0]()

  def step(params, state, x, y):
    acc = optax_sam.accumulated_grad_fn(_group_grad, (x, y), len(x) // K)
    updates, state = tx.update(acc(params), state, params, grad_fn=acc)
    return optax.apply_updates(params, updates), state

  td._assert_close(_train(step, tx), _train(td._train_step(tx, False), tx), tol=1e-6)


def test_accumulation_with_a_perturbation_per_micro_batch_is_m_sharpness():
  """The scan route with m = the micro-batch size: the per-device reference with m = 2."""
  tx = td.VARIANTS['fsam'][0]()
  params, _ = _train(_grouped_step(tx, 'scan', m=len(td.X) // 8), tx)
  td._assert_close(params, td._reference('fsam', local=True), tol=3e-6)


def _multi_steps_run(tx, two_phase):
  """optax.MultiSteps(tx, K) fed one micro-batch per call, STEPS SAM steps."""
  multi = optax.MultiSteps(tx, every_k_schedule=K)
  step = jax.jit(td._train_step(multi, two_phase))
  params, state = td.PARAMS, multi.init(td.PARAMS)
  micro = len(td.X) // K
  for _ in range(td.STEPS * (2 if two_phase else 1)):
    for k in range(K):
      rows = slice(k * micro, (k + 1) * micro)
      params, state = step(params, state, td.X[rows], td.Y[rows])
  return optax_sam.clean_params(params, state)


def test_multi_steps_with_two_phase_sam_equals_sam_on_the_whole_batch():
  """MultiSteps averages the clean gradients (ascent), then the perturbed ones (descent)."""
  for name in ('fsam', 'stablesam'):
    expected = td._single_device(name)
    td._assert_close(_multi_steps_run(td.VARIANTS[name][0](two_phase=True), True), expected, 2e-6)


def test_multi_steps_with_one_call_sam_is_neither_semantics():
  """Why a helper is needed: MultiSteps hands SAM the last micro-batch's grad_fn only."""
  got = _multi_steps_run(td.VARIANTS['sam'][0](), False)
  assert td._max_diff(got, td._single_device('sam')) > 1e-3
  assert td._max_diff(got, td._reference('sam', local=True)) > 1e-3


# ------------------------------------------------------------------------------------ docs


def test_distributed_docs_micro_batch_recipes_run_and_agree():
  """docs/distributed.md's section runs; its steps equal the vmap route and plain SAM.

  The grouped step under sharded jit equals the vmap route on one unsharded
  batch, and the accumulated step equals SAM on the whole batch.
  """
  text = td.DOC.read_text()
  before, section = text.split(td.MICRO_BATCHES_HEADING)
  setup = re.findall(r'```python\n(.*?)```', before, flags=re.S)[:2]  # the model, the mesh
  blocks = re.findall(r'```python\n(.*?)```', section.split('\n## ')[0], flags=re.S)
  assert len(blocks) == 2
  ns = {'__name__': 'distributed_doc'}
  for block in setup:
    exec(compile(block, str(td.DOC), 'exec'), ns)
  loss_fn, params0, host_batch = ns['loss_fn'], ns['params0'], ns['host_batch']

  def run(tx, step, n=5):
    params, state = params0, tx.init(params0)
    for _ in range(n):
      params, state = step(params, state, host_batch)
    return params

  exec(compile(blocks[0], str(td.DOC), 'exec'), ns)
  tx = ns['tx']

  @jax.jit
  def vmap_step(params, state, batch):
    groups = optax_sam.micro_batches(jax.grad(loss_fn), batch, 8, route='vmap')
    updates, state = tx.update(None, state, params, grad_fn=groups)
    return optax.apply_updates(params, updates), state

  td._assert_close(ns['params'], run(tx, vmap_step), tol=1e-5)
  exec(compile(blocks[1], str(td.DOC), 'exec'), ns)
  tx = ns['tx']

  @jax.jit
  def sam_step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, batch))
    return optax.apply_updates(params, updates), state

  td._assert_close(ns['params'], run(tx, sam_step), tol=1e-5)
