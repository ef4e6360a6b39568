"""The SAM step's own statistics: values worked by hand, both modes, devices, and their cost."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_sam
import optax_sam.flax
from tests import helpers

VARIANTS = {
  name: lambda v=helpers.VARIANTS[name], **k: v.make(optax.sgd(0.1, momentum=0.9), **k)
  for name in (*helpers.CORE, *helpers.FAMILY)
}


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def _dot(a, b):
  return float(
    sum(
      np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
  )


def _one_call(tx, params, grad_fn, steps):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  history = []
  for _ in range(steps):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    if jax.tree.leaves(state.statistics):
      history.append(optax_sam.step_statistics(state))
  return params, state, history


def _two_phase(tx, params, grad_fn, steps):
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p))
  history = []
  for _ in range(2 * steps):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    if jax.tree.leaves(state.statistics) and not optax_sam.is_perturbed(state):
      history.append(optax_sam.step_statistics(state))
  return params, state, history


def test_sam_statistics_equal_the_formulas():
  params, _, grad_fn = helpers.problem()
  rho = 0.1
  tx = optax_sam.sam(optax.sgd(0.1), rho=rho, statistics=True)
  _, state, (stats,) = _one_call(tx, params, grad_fn, steps=1)
  g = grad_fn(params)
  e = jax.tree.map(lambda x: rho * x / _norm(g), g)
  g_adv = grad_fn(jax.tree.map(lambda w, d: w + d, params, e))
  np.testing.assert_allclose(stats.grad_norm, _norm(g), rtol=1e-6)
  np.testing.assert_allclose(stats.adv_grad_norm, _norm(g_adv), rtol=1e-6)
  np.testing.assert_allclose(stats.perturbation_norm, rho, rtol=1e-6)
  np.testing.assert_allclose(stats.cosine, _dot(g, g_adv) / (_norm(g) * _norm(g_adv)), rtol=1e-6)
  assert float(stats.ema_cosine) == 0.0  # SAM keeps no EMA
  assert float(stats.moved_fraction) == 1.0  # float32 weights: every coordinate moves
  np.testing.assert_allclose(stats.effective_ratio, 1.0, atol=1e-5)
  np.testing.assert_allclose(stats.effective_cosine, 1.0, atol=1e-5)
  along = _dot(g_adv, e) - _dot(g, e)
  np.testing.assert_allclose(stats.directional_sharpness, along / rho**2, rtol=1e-4)
  assert all(x.dtype == jnp.float32 and x.shape == () for x in stats)


@pytest.mark.parametrize('two_phase', (False, True))
def test_directional_sharpness_is_the_hessians_along_e_on_a_quadratic(two_phase):
  """Exact for a quadratic loss: e^T A e / ||e||^2, as sharpness.directional_sharpness says."""
  with jax.enable_x64(True):
    a = jnp.diag(jnp.array([4.0, 1.0, 0.25])) + 0.1
    loss = lambda p, batch=None: 0.5 * p['w'] @ a @ p['w'] + jnp.sum(p['w'])
    params = {'w': jnp.array([1.0, -2.0, 0.5])}
    tx = optax_sam.sam(optax.sgd(0.05), rho=0.2, statistics=True, two_phase=two_phase)
    state, w = tx.init(params), params
    for _ in range(2 if two_phase else 1):
      updates, state = tx.update(
        jax.grad(loss)(w), state, w, **helpers.grad_fn_for(state, jax.grad(loss))
      )
      w = optax.apply_updates(w, updates)
    stats = optax_sam.step_statistics(state)
    g = jax.grad(loss)(params)
    e = jax.tree.map(lambda x: 0.2 * x / optax.tree.norm(g), g)
    want = optax_sam.sharpness.directional_sharpness(loss, params, None, e).sharpness
    np.testing.assert_allclose(stats.directional_sharpness, want, rtol=1e-10)


def test_friendly_sam_ema_cosine_is_that_of_the_removed_ema():
  params, _, grad_fn = helpers.problem()
  lmbda = 0.7
  tx = optax_sam.friendly_sam(optax.sgd(0.1), rho=0.05, lmbda=lmbda, statistics=True)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  grads = []
  for _ in range(3):
    grads.append(grad_fn(params))
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    stats = optax_sam.step_statistics(state)
    if len(grads) == 1:
      assert float(stats.ema_cosine) == 0.0  # the EMA is still zero at the first step
      m = grads[0]
    else:
      g = grads[-1]
      np.testing.assert_allclose(stats.ema_cosine, _dot(m, g) / (_norm(m) * _norm(g)), rtol=1e-5)
      m = jax.tree.map(lambda a, b: lmbda * a + (1 - lmbda) * b, m, g)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_two_phase_statistics_equal_one_call(name):
  params, _, grad_fn = helpers.problem()
  _, _, one = _one_call(VARIANTS[name](statistics=True), params, grad_fn, steps=3)
  _, _, two = _two_phase(VARIANTS[name](statistics=True, two_phase=True), params, grad_fn, steps=3)
  assert len(one) == len(two) == 3
  for a, b in zip(one, two, strict=True):
    for field in optax_sam.SAMStatistics._fields:
      np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=2e-5, err_msg=field)


@pytest.mark.parametrize('two_phase', (False, True))
@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_statistics_change_nothing_else(name, two_phase):
  params, _, grad_fn = helpers.problem()
  run = _two_phase if two_phase else _one_call
  p_on, s_on, _ = run(VARIANTS[name](statistics=True, two_phase=two_phase), params, grad_fn, 3)
  p_off, s_off, _ = run(VARIANTS[name](two_phase=two_phase), params, grad_fn, 3)
  assert helpers.max_diff(p_on, p_off) == 0.0
  assert jax.tree.leaves(s_off.statistics) == []
  rest_on, rest_off = s_on._replace(statistics=()), s_off._replace(statistics=())
  assert jax.tree.structure(rest_on) == jax.tree.structure(rest_off)
  for a, b in zip(jax.tree.leaves(rest_on), jax.tree.leaves(rest_off), strict=True):
    np.testing.assert_array_equal(a, b)


def test_statistics_off_add_no_state_and_no_work():
  """Off, the state has no extra leaf and the compiled step is the step without statistics.

  The step with statistics on, with its statistics dropped from the outputs,
  compiles (dead code removed) to the program of the step with them off:
  the same instructions and the same memory.
  """
  params, loss, grad_fn = helpers.problem()
  off = optax_sam.friendly_sam(optax.sgd(0.1, momentum=0.9), statistics=False)
  on = optax_sam.friendly_sam(optax.sgd(0.1, momentum=0.9), statistics=True)
  base_leaves = jax.tree.leaves((off.init(params).perturbation_state, off.init(params).base_state))
  assert len(jax.tree.leaves(off.init(params))) == len(base_leaves)
  fields = len(optax_sam.SAMStatistics._fields)
  assert len(jax.tree.leaves(on.init(params))) == len(base_leaves) + fields

  def stepper(tx):
    def step(p, s):
      u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s.perturbation_state, s.base_state

    return step

  def compiled(tx):
    return jax.jit(stepper(tx)).lower(params, tx.init(params)).compile()

  def opcodes(c):
    text = re.sub(r', metadata=\{[^}]*\}', '', c.as_text())
    return collections.Counter(re.findall(r'= \S+ (\w[\w-]*)\(', text))

  c_off, c_on = compiled(off), compiled(on)
  assert sum(opcodes(c_off).values()) > 20  # the pattern reads the program's instructions
  assert opcodes(c_off) == opcodes(c_on)
  m_off, m_on = c_off.memory_analysis(), c_on.memory_analysis()
  assert m_off.temp_size_in_bytes == m_on.temp_size_in_bytes
  assert m_off.output_size_in_bytes == m_on.output_size_in_bytes
  assert m_off.argument_size_in_bytes == m_on.argument_size_in_bytes  # unused inputs are pruned


def test_statistics_on_cost_no_parameter_sized_memory():
  """On, the one-call step's temporaries grow by at most two parameter-sized buffers.

  The cosine of g and g_adv needs g alive across the perturbed pass, and the
  rounding measures read e; nothing else may add memory (norms of fused values
  use plain reductions).
  """
  k = jax.random.split(jax.random.key(0), 3)
  params = {'w1': jax.random.normal(k[0], (256, 512)), 'w2': jax.random.normal(k[1], (512, 10))}
  x = jax.random.normal(k[2], (32, 256))
  grad_fn = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p['w1']) @ p['w2']) ** 2)
  param_bytes = sum(v.size * 4 for v in params.values())

  def temp(tx):
    step = lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    c = jax.jit(step).lower(params, tx.init(params)).compile()
    return c.memory_analysis().temp_size_in_bytes

  extra = temp(optax_sam.sam(optax.sgd(0.1), statistics=True)) - temp(optax_sam.sam(optax.sgd(0.1)))
  assert extra <= 2.2 * param_bytes, (extra, param_bytes)


@pytest.mark.devices(8)
def test_local_perturbation_statistics_are_the_device_average():
  n = 8
  params, loss, _ = helpers.problem()
  x = jax.random.normal(jax.random.key(1), (n, 2, 5))
  y = jax.random.normal(jax.random.key(2), (n, 2, 3))
  tx = optax_sam.sam(
    optax.sgd(0.1), rho=0.1, axis_name='d', local_perturbation=True, statistics=True
  )

  def step(p, s, x, y):
    grad_fn = lambda q: jax.grad(loss)(q, x, y)
    _, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax_sam.step_statistics(s)

  stacked = jax.pmap(step, axis_name='d', in_axes=(None, None, 0, 0))(params, tx.init(params), x, y)
  for field in stacked:
    assert np.all(np.asarray(field) == np.asarray(field)[0])  # identical on every device
  single = optax_sam.sam(optax.sgd(0.1), rho=0.1, statistics=True)
  per_device = []
  for i in range(n):
    grad_fn = lambda q, i=i: jax.grad(loss)(q, x[i], y[i])
    _, s = single.update(grad_fn(params), single.init(params), params, grad_fn=grad_fn)
    per_device.append(optax_sam.step_statistics(s))
  for j, field in enumerate(optax_sam.SAMStatistics._fields):
    want = np.mean([float(s[j]) for s in per_device])
    np.testing.assert_allclose(np.asarray(stacked[j])[0], want, rtol=1e-5, err_msg=field)


def test_bfloat16_two_phase_reports_the_rounding():
  """Two-phase bfloat16 weights hold w + e in bfloat16: the statistics show what survived."""
  params, _, grad_fn = helpers.problem(jnp.bfloat16)
  tx = optax_sam.sam(optax.sgd(0.1), rho=1e-3, two_phase=True, statistics=True)
  _, _, (stats,) = _two_phase(tx, params, grad_fn, steps=1)
  assert 0.0 <= float(stats.moved_fraction) < 0.5
  assert float(stats.effective_cosine) < 0.9


def test_step_statistics_through_wrappers_and_nnx_optimizer():
  params, _, grad_fn = helpers.problem()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax_sam.sam(optax.sgd(0.1), statistics=True))
  _, state = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  assert float(optax_sam.step_statistics(state).perturbation_norm) == pytest.approx(0.05)

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(0.1), statistics=True), wrt=nnx.Param)
  x = jnp.ones((4, 3))
  loss_fn = lambda m: jnp.mean(m(x) ** 2)
  grads = nnx.grad(loss_fn)(model)
  grad_fn = optax_sam.flax.nnx_grad_fn(loss_fn, model)
  optimizer.update(model, grads, grad_fn=grad_fn)
  stats = optax_sam.step_statistics(nnx.as_pure(optimizer.opt_state))
  assert float(stats.perturbation_norm) == pytest.approx(0.05)
  assert float(stats.grad_norm) == pytest.approx(_norm(nnx.as_pure(grads)), rel=1e-6)


def test_step_statistics_without_them_is_a_clear_error():
  tx = optax_sam.sam(optax.sgd(0.1))
  with pytest.raises(ValueError, match='statistics=True'):
    optax_sam.step_statistics(tx.init(jnp.zeros(2)))
