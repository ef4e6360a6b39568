"""m-RWP and m-ARWP: the same update as the formula given the same noise, and the noise's scale."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers


def draws(seed: int, params, steps: int) -> list:
  """The standard normals the perturbation draws at each step, replayed from its key schedule."""
  key, out = jax.random.key(seed), []
  leaves, treedef = jax.tree.flatten(params)
  for _ in range(steps):
    key, draw = jax.random.split(key)
    keys = jax.random.split(draw, len(leaves))
    normals = [
      jax.random.normal(k, w.shape, jnp.promote_types(jnp.float32, w.dtype))
      for k, w in zip(keys, leaves, strict=True)
    ]
    out.append(jax.tree.unflatten(treedef, normals))
  return out


def filter_norms(w):
  if w.ndim <= 1:
    return jnp.linalg.norm(w) + 1e-16
  return jnp.linalg.norm(w, axis=tuple(range(w.ndim - 1)), keepdims=True)


@pytest.mark.parametrize('two_phase', [False, True])
def test_equals_the_formula_given_the_same_noise(two_phase):
  """(1 - lmbda) g + lmbda grad L(w + e), e = sigma ||W_i|| z per output filter, every step."""
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax_sam.mrwp(base, sigma=0.2, lmbda=0.3, seed=4, two_phase=two_phase)
  state, w = tx.init(params), params
  base_state, v = base.init(params), params
  for z in draws(4, params, 3):
    for _ in range(2 if two_phase else 1):
      u, state = tx.update(grad_fn(w), state, w, **helpers.grad_fn_for(state, grad_fn))
      w = optax.apply_updates(w, u)
    e = jax.tree.map(lambda x, n: 0.2 * filter_norms(x) * n, v, z)
    g_adv = grad_fn(jax.tree.map(jnp.add, v, e))
    mixed = jax.tree.map(lambda a, b: 0.7 * a + 0.3 * b, grad_fn(v), g_adv)
    want, base_state = base.update(mixed, base_state, v)
    v = optax.apply_updates(v, want)
    assert helpers.max_diff(w, v) < 1e-6


def official_marwp_noise(w_torch, z_torch, fisher_torch, sigma, eta):
  """nblt/mARWP ``train_marwp.py``'s noise, line by line in NumPy, on PyTorch-oriented arrays
  (a kernel's output filters along axis 0), given its standard normals ``z``."""
  sh = w_torch.shape
  sh_mul = int(np.prod(sh[1:]))
  if len(sh) > 1:
    temp = np.repeat(np.linalg.norm(w_torch.reshape(sh[0], -1), axis=1)[:, None], sh_mul, axis=1)
    temp = (sigma * temp.reshape(sh)) * z_torch
  else:
    temp = sigma * (np.linalg.norm(w_torch.reshape(-1)) + 1e-16) * z_torch
  if fisher_torch is not None:  # fisher_arr != []: after the first SAM step
    fisher = np.repeat(fisher_torch.reshape(sh[0], -1).sum(axis=1, keepdims=True), sh_mul, axis=1)
    temp = temp / np.sqrt(1 + eta * fisher.reshape(sh))
  return temp


@pytest.mark.parametrize('two_phase', [False, True])
def test_marwp_equals_the_official_loop_given_the_same_noise(two_phase):
  """m-ARWP: the noise divided by sqrt(1 + eta F_i), F = beta F + g_adv^2 from the second step on
  (the official loop's fisher_arr), the gradients mixed; float64, four steps."""
  jax.config.update('jax_enable_x64', True)
  try:
    params, _, grad_fn = helpers.problem(jnp.float64)
    base = optax.sgd(0.1, momentum=0.9)
    sigma, lmbda, eta, beta = 0.3, 0.4, 2.0, 0.8
    tx = optax_sam.marwp(
      base, sigma=sigma, lmbda=lmbda, eta=eta, beta=beta, seed=5, two_phase=two_phase
    )
    state, w = tx.init(params), params
    base_state, v = base.init(params), params
    fisher = None  # the official fisher_arr, PyTorch-oriented (kernel transposed)
    torch = lambda tree: {'kernel': np.asarray(tree['kernel']).T, 'bias': np.asarray(tree['bias'])}
    for z in draws(5, params, 4):
      for _ in range(2 if two_phase else 1):
        u, state = tx.update(grad_fn(w), state, w, **helpers.grad_fn_for(state, grad_fn))
        w = optax.apply_updates(w, u)
      vt, zt = torch(v), torch(jax.tree.map(lambda x: x.astype(jnp.float64), z))
      noise = {
        k: official_marwp_noise(vt[k], zt[k], None if fisher is None else fisher[k], sigma, eta)
        for k in vt
      }
      e = {'kernel': jnp.asarray(noise['kernel'].T), 'bias': jnp.asarray(noise['bias'])}
      g_adv = grad_fn(jax.tree.map(jnp.add, v, e))
      g_adv_t = torch(g_adv)
      fisher = {k: (0 if fisher is None else fisher[k]) * beta + g_adv_t[k] ** 2 for k in g_adv_t}
      mixed = jax.tree.map(lambda a, b: (1 - lmbda) * a + lmbda * b, grad_fn(v), g_adv)
      want, base_state = base.update(mixed, base_state, v)
      v = optax.apply_updates(v, want)
      assert helpers.max_diff(w, v) < 1e-12
      memory = state.memory
      np.testing.assert_allclose(memory.fisher['kernel'], fisher['kernel'].T, rtol=1e-12)
      np.testing.assert_allclose(memory.fisher['bias'], fisher['bias'], rtol=1e-12)
  finally:
    jax.config.update('jax_enable_x64', False)


def test_marwp_with_eta_zero_is_mrwp_and_errors():
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  a, b = optax_sam.marwp(base, sigma=0.2, eta=0.0, seed=3), optax_sam.mrwp(base, sigma=0.2, seed=3)
  sa, sb, wa, wb = a.init(params), b.init(params), params, params
  for _ in range(3):
    ua, sa = a.update(grad_fn(wa), sa, wa, grad_fn=grad_fn)
    ub, sb = b.update(grad_fn(wb), sb, wb, grad_fn=grad_fn)
    wa, wb = optax.apply_updates(wa, ua), optax.apply_updates(wb, ub)
  assert helpers.max_diff(wa, wb) == 0
  with pytest.raises(ValueError, match='eta'):
    optax_sam.marwp(base, eta=-1.0)
  with pytest.raises(ValueError, match='beta'):
    optax_sam.marwp(base, beta=1.5)
  noise = optax_sam.random_perturbation(eta=1.0)
  with pytest.raises(ValueError, match='arwp_correction'):
    noise.update(params, noise.init(params), params)


def test_the_noise_has_the_filters_scale():
  """Over 4000 entries per filter the sample std is sigma ||W_i|| within 5 %; a vector's is
  sigma ||v||; draws change from step to step and follow the seed."""
  k1, k2 = jax.random.split(jax.random.key(0))
  scales = jnp.array([0.5, 1.0, 2.0, 4.0])
  params = {'kernel': jax.random.normal(k1, (4000, 4)) * scales, 'bias': jnp.full((5000,), 0.3)}
  tx = optax_sam.random_perturbation(sigma=0.1, seed=1)
  state = tx.init(params)
  e1, state = tx.update(params, state, params)
  e2, _ = tx.update(params, state, params)
  norms = jnp.linalg.norm(params['kernel'], axis=0)
  np.testing.assert_allclose(jnp.std(e1['kernel'], axis=0), 0.1 * norms, rtol=0.05)
  np.testing.assert_allclose(jnp.mean(e1['kernel'], axis=0), 0, atol=4 * 0.1 * norms.max() / 63)
  np.testing.assert_allclose(jnp.std(e1['bias']), 0.1 * jnp.linalg.norm(params['bias']), rtol=0.05)
  assert helpers.max_diff(e1, e2) > 0.01
  again, _ = tx.update(params, tx.init(params), params)
  assert helpers.max_diff(e1, again) == 0
  other = optax_sam.random_perturbation(sigma=0.1, seed=2)
  assert helpers.max_diff(other.update(params, other.init(params), params)[0], e1) > 0.01
  # PyTorch's orientation: the filters along axis 0.
  torch_like = optax_sam.random_perturbation(sigma=0.1, output_axes=(0,))
  e, _ = torch_like.update(params, torch_like.init(params), params)
  rows = jnp.linalg.norm(params['kernel'], axis=1)
  np.testing.assert_allclose(jnp.std(e['kernel'] / rows[:, None]), 0.1, rtol=0.05)


def test_sigma_zero_and_lambda_one_is_the_base_optimizer_and_errors():
  params, _, grad_fn = helpers.problem()
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax_sam.mrwp(base, sigma=0.0, lmbda=1.0)
  u, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  want, _ = base.update(grad_fn(params), base.init(params), params)
  assert helpers.max_diff(u, want) < 1e-7
  with pytest.raises(ValueError, match='sigma'):
    optax_sam.mrwp(base, sigma=-1.0)
  with pytest.raises(ValueError, match='lmbda'):
    optax_sam.mrwp(base, lmbda=1.5)
  noise = optax_sam.random_perturbation()
  with pytest.raises(ValueError, match='needs|call update'):
    noise.update(params, noise.init(params))


RANDOM = {
  'mrwp': lambda base, **o: optax_sam.mrwp(base, sigma=0.3, **o),
  'marwp': lambda base, **o: optax_sam.marwp(base, sigma=0.3, eta=50.0, beta=0.8, **o),
}


@pytest.mark.devices(8)
@pytest.mark.parametrize('name', sorted(RANDOM))
def test_every_device_draws_the_same_noise(name):
  """Under pmap with axis_name the replicated key gives one perturbation, and m-ARWP's F the
  whole batch's perturbed gradient: three steps of the whole batch's."""
  params, loss, _ = helpers.problem()
  x, y = helpers.batch(4)
  grad = jax.grad(lambda p, x, y: loss(p, x, y))
  single = RANDOM[name](optax.sgd(0.1))
  w, state = params, single.init(params)
  for _ in range(3):
    u, state = single.update(grad(w, x, y), state, w, grad_fn=lambda p: grad(p, x, y))
    w = optax.apply_updates(w, u)
  tx = RANDOM[name](optax.sgd(0.1), axis_name='d')

  def step(params, state, x, y):
    u, state = tx.update(grad(params, x, y), state, params, grad_fn=lambda p: grad(p, x, y))
    return optax.apply_updates(params, u), state

  shards = lambda a: a.reshape(8, 2, *a.shape[1:])
  replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * 8), tree)
  v, s = replicate(params), replicate(tx.init(params))
  for _ in range(3):
    v, s = jax.pmap(step, axis_name='d')(v, s, shards(x), shards(y))
  assert helpers.max_diff(jax.tree.map(lambda a: a[0], v), w) < 1e-6


@pytest.mark.parametrize('name', sorted(RANDOM))
def test_the_wrapper_options(name):
  """when=, statistics, micro_batches (both routes), bf16 parameters and inject_hyperparams."""
  params, loss, grad_fn = helpers.problem()
  batch = helpers.batch(4)
  batch_grad = jax.grad(lambda p, b: loss(p, *b))
  whole = lambda p: batch_grad(p, batch)

  def run(tx, params, grad_fn, steps=3):
    state = tx.init(params)
    states = [state]
    step = jax.jit(lambda w, s: tx.update(grad_fn(w), s, w, grad_fn=grad_fn))
    for _ in range(steps):
      u, state = step(params, state)
      params = optax.apply_updates(params, u)
      states.append(state)
    return params, states

  want, _ = run(RANDOM[name](optax.sgd(0.1)), params, whole)

  # One group of the whole batch is the plain step; two groups take the same step on both routes.
  def grouped(size, route):
    tx, groups = (
      RANDOM[name](optax.sgd(0.1)),
      optax_sam.micro_batches(batch_grad, batch, size, route=route),
    )
    state, w = tx.init(params), params
    for _ in range(3):
      u, state = tx.update(whole(w), state, w, grad_fn=groups)
      w = optax.apply_updates(w, u)
    return w

  for route in ('scan', 'vmap'):
    assert helpers.max_diff(grouped(16, route), want) < 1e-6, route
  assert helpers.max_diff(grouped(8, 'scan'), grouped(8, 'vmap')) < 1e-6
  # when=: the plain steps keep F (only SAM steps observe a perturbed gradient).
  _, states = run(RANDOM[name](optax.sgd(0.1), when=optax_sam.every(2)), params, whole, steps=4)
  if name == 'marwp':
    fisher = [state.memory.fisher for state in states]
    changed = [helpers.max_diff(a, b) > 0 for a, b in zip(fisher, fisher[1:], strict=False)]
    assert changed == [True, False, True, False]
  # Statistics on, the same steps.
  got, states = run(RANDOM[name](optax.sgd(0.1), statistics=True), params, whole)
  assert helpers.max_diff(got, want) < 1e-6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[-1].statistics))
  # bf16 parameters: the state keeps its structure and dtypes (F in float32).
  low, _, low_grad = helpers.problem(jnp.bfloat16)
  got, states = run(RANDOM[name](optax.sgd(0.1)), low, low_grad)
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[-1])
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[-1]), strict=True):
    assert a.dtype == b.dtype
  assert all(jnp.isfinite(x).all() for x in jax.tree.leaves(got))
  if name == 'marwp':
    assert states[-1].memory.fisher['kernel'].dtype == jnp.float32
  # inject_hyperparams: the same steps, the radius a hyperparameter.
  alias = {'mrwp': optax_sam.mrwp, 'marwp': optax_sam.marwp}[name]
  extra = {'eta': 50.0, 'beta': 0.8} if name == 'marwp' else {}
  injected = optax.inject_hyperparams(alias)(optax.sgd(0.1), sigma=0.3, **extra)
  got, _ = run(injected, params, whole)
  assert helpers.max_diff(got, want) < 1e-6


@pytest.mark.parametrize('name', sorted(RANDOM))
def test_the_benchmarks_hand_written_step_is_the_alias_step(name):
  """benchmarks.run's ``ref/mrwp`` and ``ref/marwp`` (the math written out, the same key splits)
  equal the aliases with their defaults."""
  from types import SimpleNamespace  # noqa: PLC0415

  from benchmarks import references  # noqa: PLC0415 - the benchmarks are not the library

  def loss(p, model_state, batch):
    x, y = batch
    hidden = jnp.tanh(x @ p['dense']['kernel'] + p['dense']['bias'])
    return jnp.mean((hidden @ p['out'] - y) ** 2), model_state

  k = jax.random.split(jax.random.key(0), 5)
  params = {
    'dense': {'kernel': jax.random.normal(k[0], (4, 8)), 'bias': jax.random.normal(k[1], (8,))},
    'out': jax.random.normal(k[2], (8, 2)),
  }
  batch = (jax.random.normal(k[3], (16, 4)), jax.random.normal(k[4], (16, 2)))
  base = optax.sgd(0.1, momentum=0.9)
  init, step = references.reference_step(SimpleNamespace(loss=loss), base, references.MATH[name])
  tx = {'mrwp': optax_sam.mrwp, 'marwp': optax_sam.marwp}[name](base)
  grad_fn = jax.grad(lambda w: loss(w, None, batch)[0])
  state, reference_state, w, reference_w = tx.init(params), init(params), params, params
  for _ in range(3):
    updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
    w = optax.apply_updates(w, updates)
    reference_w, reference_state, _, _ = step(reference_w, reference_state, None, batch)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(reference_w), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert not np.allclose(w['out'], params['out'])
