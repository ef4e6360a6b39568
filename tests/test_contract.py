"""The Optax contract: chains, base optimizers, rho = 0, hyperparameters, dtypes, state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers

ALIASES = {
  n: helpers.VARIANTS[n].make for n in ('sam', 'usam', 'asam', 'fsam', 'stablesam', 'gsam')
}
BASES = {
  'sgd': lambda: optax.sgd(0.1),
  'momentum': lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
  'adam': lambda: optax.adam(0.01),
  'adamw': lambda: optax.adamw(0.01, weight_decay=0.1),
}


def sam_steps(tx, params, grad_fn, steps=3, two_phase=False, state=None, **extra):
  """``steps`` jitted SAM steps (two calls each in two-phase mode), from ``state`` or init."""
  state = tx.init(params) if state is None else state

  @jax.jit
  def call(params, state):
    u, state = tx.update(
      grad_fn(params), state, params, **helpers.grad_fn_for(state, grad_fn), **extra
    )
    return optax.apply_updates(params, u), state

  for _ in range(steps * (2 if two_phase else 1)):
    params, state = call(params, state)
  return params, state


@pytest.mark.parametrize('name', helpers.WRAPPED)
def test_two_phase_equals_one_call(name):
  """The calling modes' one equivalence test: every variant, AdamW with weight decay, 4 steps.

  In two-phase mode a step is the calls until the state holds no perturbation (two for a SAM
  step, one for LookSAM's steps in between); the clean weights after each step must agree.
  """
  params, _, grad_fn = helpers.problem()
  make = lambda **o: helpers.VARIANTS[name].make(optax.adamw(0.01, weight_decay=0.1), **o)
  one, two = make(), make(two_phase=True)
  one_step = jax.jit(lambda w, s: one.update(grad_fn(w), s, w, grad_fn=grad_fn))
  two_call = jax.jit(lambda w, s: two.update(grad_fn(w), s, w))
  w1, s1, w2, s2 = params, one.init(params), params, two.init(params)
  for step in range(4):
    u, s1 = one_step(w1, s1)
    w1 = optax.apply_updates(w1, u)
    u, s2 = two_call(w2, s2)
    w2 = optax.apply_updates(w2, u)
    if bool(optax_sam.is_perturbed(s2)):
      u, s2 = two_call(w2, s2)
      w2 = optax.apply_updates(w2, u)
    assert not bool(optax_sam.is_perturbed(s2))
    assert helpers.max_diff(w1, w2) < 1e-6, f'step {step}'


def base_steps(tx, params, grad_fn, steps=3):
  """``steps`` jitted steps of a plain optimizer."""
  state = tx.init(params)

  @jax.jit
  def call(params, state):
    u, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, u), state

  for _ in range(steps):
    params, state = call(params, state)
  return params


@pytest.mark.parametrize('base', sorted(BASES))
@pytest.mark.parametrize('name', sorted(ALIASES))
def test_rho_zero_is_the_base_optimizer(name, base):
  params, _, grad_fn = helpers.problem()
  want = base_steps(BASES[base](), params, grad_fn)
  got, _ = sam_steps(ALIASES[name](BASES[base](), rho=0.0), params, grad_fn)
  if name in ('sam', 'usam', 'asam', 'fsam'):
    assert helpers.max_diff(got, want) == 0.0
  else:
    assert helpers.max_diff(got, want) < 1e-6
  got2, _ = sam_steps(
    ALIASES[name](BASES[base](), rho=0.0, two_phase=True), params, grad_fn, two_phase=True
  )
  assert helpers.max_diff(got2, want) < 1e-6


def test_weight_decay_sees_unperturbed_weights():
  """AdamW's decoupled weight decay is applied at w, not at w + e."""
  params, _, grad_fn = helpers.problem()
  base = optax.adamw(0.01, weight_decay=0.5)
  tx = optax_sam.sam(base, rho=0.2)
  updates, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  g = grad_fn(params)
  norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, gi: w + 0.2 * gi / norm, params, g)
  want, _ = base.update(grad_fn(perturbed), base.init(params), params)
  assert helpers.max_diff(updates, want) < 1e-7


def test_inside_chain_and_extra_args_ignored():
  params, _, grad_fn = helpers.problem()
  tx = optax.chain(optax.clip_by_global_norm(10.0), optax_sam.sam(optax.sgd(0.1), rho=0.1))
  plain = optax_sam.sam(optax.sgd(0.1), rho=0.1)
  got, _ = sam_steps(tx, params, grad_fn, unknown_argument=3)
  want, _ = sam_steps(plain, params, grad_fn)
  assert helpers.max_diff(got, want) == 0.0


def test_grad_fn_called_exactly_once_and_no_retracing():
  params, _, grad_fn = helpers.problem()
  calls, traces = [], []

  def counting_grad_fn(p):
    calls.append(1)
    return grad_fn(p)

  tx = optax_sam.friendly_sam(optax.adam(0.01), stable=True)

  @jax.jit
  def step(params, state):
    traces.append(1)
    u, state = tx.update(grad_fn(params), state, params, grad_fn=counting_grad_fn)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1 and len(calls) == 1

  calls.clear()
  eager = optax_sam.sam(optax.sgd(0.1))
  eager.update(grad_fn(params), eager.init(params), params, grad_fn=counting_grad_fn)
  assert len(calls) == 1


@pytest.mark.parametrize('two_phase', [False, True])
def test_no_retracing_two_phase_and_structure_stable(two_phase):
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.gsam(optax.adam(0.01), two_phase=two_phase)
  traces = []

  @jax.jit
  def update(g, s, p):
    traces.append(1)
    return tx.update(g, s, p, **helpers.grad_fn_for(s, grad_fn))

  state0 = tx.init(params)
  state = state0
  for _ in range(4):
    u, state = update(grad_fn(params), state, params)
    params = optax.apply_updates(params, u)
  assert len(traces) == 1
  assert jax.tree.structure(state) == jax.tree.structure(state0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_inject_hyperparams_changes_rho_between_steps():
  params, _, grad_fn = helpers.problem()
  tx = optax.inject_hyperparams(optax_sam.friendly_sam)(optax.sgd(0.1), rho=0.05, sigma=0.5)
  state = tx.init(params)
  u1, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  state.hyperparams['rho'] = jnp.asarray(0.3)
  p1 = optax.apply_updates(params, u1)
  u2, state = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(grad_fn(p1), state, p1)
  # The same two steps with a fresh optimizer whose rho changes by hand.
  ref_a = optax_sam.friendly_sam(optax.sgd(0.1), rho=0.05, sigma=0.5)
  ref_b = optax_sam.friendly_sam(optax.sgd(0.1), rho=0.3, sigma=0.5)
  s = ref_a.init(params)
  v1, s = ref_a.update(grad_fn(params), s, params, grad_fn=grad_fn)
  v2, _ = ref_b.update(grad_fn(p1), s, p1, grad_fn=grad_fn)
  assert helpers.max_diff(u1, v1) == 0.0
  assert helpers.max_diff(u2, v2) < 1e-7
  assert helpers.max_diff(v2, ref_a.update(grad_fn(p1), s, p1, grad_fn=grad_fn)[0]) > 1e-5


@pytest.mark.parametrize(
  'two_phase, plain_steps',
  [(False, 0), (True, 0), (False, 2)],
  ids=['one_call', 'two_phase', 'when'],
)
def test_rho_schedule_is_indexed_by_the_step_count(two_phase, plain_steps):
  """Step t uses rho = schedule(t): a two-phase pair counts once, a plain step under when= too."""
  params, _, grad_fn = helpers.problem()
  schedule = optax.linear_schedule(0.0, 0.3, transition_steps=4)
  when = optax_sam.after(plain_steps) if plain_steps else None
  tx = optax_sam.sam(optax.sgd(0.1), rho=schedule, two_phase=two_phase, when=when)
  got, state = sam_steps(tx, params, grad_fn, steps=4, two_phase=two_phase)
  assert int(state.perturbation_state.count) == 4
  p = params
  for step in range(4):
    rho = 0.0 if step < plain_steps else float(schedule(step))
    tx = optax_sam.sam(optax.sgd(0.1), rho=rho)
    u, _ = tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn)
    p = optax.apply_updates(p, u)
  assert helpers.max_diff(got, p) < 1e-6


def test_multisteps_accumulates_then_takes_one_sam_step():
  params, _, grad_fn = helpers.problem()
  _, loss, _ = helpers.problem()
  x2 = jax.random.normal(jax.random.key(9), (16, 5))
  y2 = jax.random.normal(jax.random.key(8), (16, 3))
  grad_fn2 = jax.grad(lambda p: loss(p, x2, y2))
  inner = optax_sam.sam(optax.sgd(0.1), rho=0.1)
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  state = tx.init(params)
  u1, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  assert helpers.max_diff(u1, jax.tree.map(jnp.zeros_like, u1)) == 0.0
  u2, state = tx.update(grad_fn2(params), state, params, grad_fn=grad_fn2)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grad_fn(params), grad_fn2(params))
  want, _ = inner.update(mean, inner.init(params), params, grad_fn=grad_fn2)
  assert helpers.max_diff(u2, want) < 1e-7


def test_none_leaves_pass_through():
  params, _, grad_fn = helpers.problem()
  with_none = {**params, 'frozen': None}
  gf = lambda p: {**grad_fn({'kernel': p['kernel'], 'bias': p['bias']}), 'frozen': None}
  for make in ALIASES.values():
    for two_phase in (False, True):
      tx = make(optax.adam(0.01), two_phase=two_phase)
      got, _ = sam_steps(tx, with_none, gf, steps=2, two_phase=two_phase)
      assert got['frozen'] is None
      want, _ = sam_steps(
        make(optax.adam(0.01), two_phase=two_phase), params, grad_fn, 2, two_phase
      )
      assert helpers.max_diff({k: got[k] for k in params}, want) == 0.0


def test_masked_node_passes_through_building_blocks():
  g = {'a': jnp.array([3.0, 4.0]), 'b': optax.MaskedNode()}
  for tx in (
    optax_sam.ascent(0.1, adaptive=True),
    optax.chain(optax_sam.friendly_direction(), optax_sam.ascent()),
  ):
    e, _ = tx.update(g, tx.init(g), g)
    assert isinstance(e['b'], optax.MaskedNode)
  np.testing.assert_allclose(
    optax_sam.ascent(0.1).update(g, optax.EmptyState(), g)[0]['a'], [0.06, 0.08]
  )


DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


@pytest.mark.parametrize('dtype', DTYPES + [jnp.float64], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize('name', sorted(ALIASES))
@pytest.mark.parametrize('two_phase', [False, True], ids=['one_call', 'two_phase'])
def test_dtypes_preserved(name, dtype, two_phase):
  with jax.enable_x64(dtype == jnp.float64):
    params, _, grad_fn = helpers.problem(dtype)
    # Momentum SGD: optax.adam itself overflows in float16 (its eps underflows to 0).
    tx = ALIASES[name](optax.sgd(0.01, momentum=0.9), two_phase=two_phase)
    state0 = tx.init(params)
    new_params, state = sam_steps(tx, params, grad_fn, steps=2, two_phase=two_phase)
    for leaf in jax.tree.leaves(new_params):
      assert leaf.dtype == dtype
      assert bool(jnp.all(jnp.isfinite(leaf)))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0), strict=True):
      assert a.dtype == b.dtype and a.shape == b.shape


def test_norm_computed_in_float32_for_float16():
  """Squares of these float16 gradients overflow float16; e must still have norm rho."""
  g = {'w': jnp.full((1000,), 300.0, jnp.float16)}
  e, _ = optax_sam.ascent(0.1).update(g, optax.EmptyState(), g)
  assert e['w'].dtype == jnp.float16
  np.testing.assert_allclose(float(jnp.linalg.norm(e['w'].astype(jnp.float32))), 0.1, rtol=1e-3)
  c = optax_sam.stable_correction()
  out = c.apply(c.prepare(g, g), g, g)
  np.testing.assert_allclose(np.asarray(out['w'], np.float32), 300.0, rtol=1e-3)


def test_ema_dtype_option():
  params, _, grad_fn = helpers.problem(jnp.bfloat16)
  tx = optax_sam.friendly_sam(optax.sgd(0.1), ema_dtype=jnp.float32)
  _, state = sam_steps(tx, params, grad_fn, steps=2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.perturbation_state[0].ema))


@pytest.mark.parametrize('name', sorted(ALIASES))
@pytest.mark.parametrize('eps', [0.0, 1e-12])
def test_zero_gradient_gives_zero_perturbation_and_no_nan(name, eps):
  params = {'w': jnp.ones(3), 'bias': jnp.zeros(2)}
  zero = lambda p: jax.tree.map(jnp.zeros_like, p)
  for two_phase in (False, True):
    tx = ALIASES[name](optax.sgd(0.1), eps=eps, two_phase=two_phase)
    state = tx.init(params)
    u, state = tx.update(zero(params), state, params, **helpers.grad_fn_for(state, zero))
    for leaf in jax.tree.leaves((u, state)):
      assert bool(jnp.all(jnp.isfinite(leaf)))
    assert helpers.max_diff(u, zero(params)) == 0.0


def test_non_finite_gradients_propagate_so_apply_if_finite_skips():
  params, _, grad_fn = helpers.problem()
  nan_grad = lambda p: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
  tx = optax.apply_if_finite(optax_sam.friendly_sam(optax.adam(0.01)), max_consecutive_errors=5)
  state = tx.init(params)
  u, state = tx.update(nan_grad(params), state, params, grad_fn=grad_fn)
  assert helpers.max_diff(u, jax.tree.map(jnp.zeros_like, u)) == 0.0
  assert int(state.notfinite_count) == 1
  raw = optax_sam.sam(optax.sgd(0.1))
  u, _ = raw.update(nan_grad(params), raw.init(params), params, grad_fn=grad_fn)
  assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(u))


def test_clean_params_through_wrappers():
  params, _, grad_fn = helpers.problem()
  tx = optax.inject_hyperparams(optax_sam.sam)(optax.sgd(0.1), rho=0.5, two_phase=True)
  state = tx.init(params)
  assert helpers.max_diff(optax_sam.clean_params(params, state), params) == 0.0
  assert not bool(optax_sam.is_perturbed(state))
  u, state = tx.update(grad_fn(params), state, params)
  perturbed = optax.apply_updates(params, u)
  assert bool(optax_sam.is_perturbed(state))
  assert helpers.max_diff(perturbed, params) > 1e-3
  assert helpers.max_diff(optax_sam.clean_params(perturbed, state), params) == 0.0
  one_call = optax_sam.sam(optax.sgd(0.1))
  assert optax_sam.clean_params(params, one_call.init(params)) is params


def test_minimizes_a_quadratic():
  params = {'w': jnp.array([3.0, -2.0])}
  loss = lambda p: jnp.sum((p['w'] - 1.0) ** 2)
  for make in ALIASES.values():
    got, _ = sam_steps(make(optax.sgd(0.1), rho=0.01), params, jax.grad(loss), steps=100)
    assert float(loss(got)) < 1e-3


@pytest.mark.devices(8)
@pytest.mark.parametrize('name', sorted(ALIASES))
@pytest.mark.parametrize('two_phase', [False, True], ids=['one_call', 'two_phase'])
def test_eager_init_state_shardings_follow_params(name, two_phase):
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  params = {'kernel': jax.device_put(jnp.ones((8, 3)), sharding), 'bias': jnp.zeros(3)}
  state = ALIASES[name](optax.adam(0.01), two_phase=two_phase).init(params)
  shaped_like_kernel = [x for x in jax.tree.leaves(state) if x.shape == (8, 3)]
  assert shaped_like_kernel
  for leaf in shaped_like_kernel:
    assert leaf.sharding.is_equivalent_to(sharding, 2)


def test_prefix_adaptive_mask_like_optax_masked():
  params = {
    'dense': {'kernel': jnp.full((2,), 2.0), 'bias': jnp.full((2,), 2.0)},
    'out': jnp.ones(2),
  }
  g = jax.tree.map(jnp.ones_like, params)
  prefix = {'dense': True, 'out': False}
  full = {'dense': {'kernel': True, 'bias': True}, 'out': False}
  tx_prefix = optax_sam.ascent(0.1, adaptive=True, adaptive_mask=prefix)
  tx_full = optax_sam.ascent(0.1, adaptive=True, adaptive_mask=lambda p: full)
  e_prefix, _ = tx_prefix.update(g, optax.EmptyState(), params)
  e_full, _ = tx_full.update(g, optax.EmptyState(), params)
  assert helpers.max_diff(e_prefix, e_full) == 0.0
  # T = 2 on 'dense', 1 on 'out': e = rho T^2 g / ||T g|| = 0.1 * [4, 4, 4, 4, 1, 1] / sqrt(18).
  np.testing.assert_allclose(e_full['dense']['kernel'], 0.4 / np.sqrt(18), rtol=1e-6)
  np.testing.assert_allclose(e_full['out'], 0.1 / np.sqrt(18), rtol=1e-6)


@pytest.mark.parametrize('two_phase', [False, True], ids=['one_call', 'two_phase'])
def test_updates_in_the_params_dtype_when_gradients_are_wider(two_phase):
  params, _, grad_fn = helpers.problem(jnp.bfloat16)
  wide_grad_fn = lambda p: optax.tree.cast(grad_fn(p), jnp.float32)
  tx = optax_sam.sam(optax.sgd(0.1), two_phase=two_phase)
  state = tx.init(params)
  updates, _ = tx.update(
    wide_grad_fn(params), state, params, **helpers.grad_fn_for(state, wide_grad_fn)
  )
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


def test_aliases_return_extra_args_transformations():
  for make in (
    optax_sam.sam,
    optax_sam.asam,
    optax_sam.friendly_sam,
    optax_sam.stable_sam,
    optax_sam.gsam,
  ):
    assert isinstance(make(optax.sgd(0.1)), optax.GradientTransformationExtraArgs)


def test_defaults_follow_the_official_code():
  """Each alias with no hyperparameters equals the explicit official defaults."""
  params, _, grad_fn = helpers.problem()
  pairs = [
    (optax_sam.sam, dict(rho=0.05, eps=1e-12)),
    (optax_sam.stable_sam, dict(rho=0.05, normalize=False)),
    (optax_sam.gsam, dict(rho=0.05, alpha=0.4)),
    (optax_sam.asam, dict(rho=0.5, eta=0.01, adaptive_mask=optax_sam.not_bias_mask)),
    (optax_sam.friendly_sam, dict(rho=0.05, sigma=1.0, lmbda=0.9)),
  ]
  for make, explicit in pairs:
    got, _ = sam_steps(make(optax.sgd(0.1)), params, grad_fn, steps=2)
    want, _ = sam_steps(make(optax.sgd(0.1), **explicit), params, grad_fn, steps=2)
    other, _ = sam_steps(make(optax.sgd(0.1), rho=0.2), params, grad_fn, steps=2)
    assert helpers.max_diff(got, want) == 0.0
    assert helpers.max_diff(got, other) > 1e-5


@pytest.mark.parametrize(
  'alias, fixed, name, value',
  [
    (optax_sam.friendly_sam, dict(sigma=0.5), 'lmbda', 0.3),
    (optax_sam.gsam, {}, 'alpha', 0.9),
    (optax_sam.asam, {}, 'eta', 0.5),
  ],
)
def test_inject_hyperparams_other_hyperparameters(alias, fixed, name, value):
  params, _, grad_fn = helpers.problem()
  injected = optax.inject_hyperparams(alias)(optax.sgd(0.1), **fixed, **{name: 0.1})
  state = injected.init(params)
  state.hyperparams[name] = jnp.asarray(value)
  # Three steps: F-SAM's lmbda first reaches the perturbation at the third.
  got, _ = sam_steps(injected, params, grad_fn, steps=3, state=state)
  want, _ = sam_steps(alias(optax.sgd(0.1), **fixed, **{name: value}), params, grad_fn, steps=3)
  unchanged, _ = sam_steps(alias(optax.sgd(0.1), **fixed, **{name: 0.1}), params, grad_fn, 3)
  assert helpers.max_diff(got, want) < 1e-7
  assert helpers.max_diff(got, unchanged) > 1e-6


def test_apply_if_finite_around_two_phase_skips_a_nan_call():
  params, _, grad_fn = helpers.problem()
  tx = optax.apply_if_finite(optax_sam.sam(optax.sgd(0.1), two_phase=True), 5)
  state = tx.init(params)
  nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  u, state = tx.update(nan, state, params)
  assert helpers.max_diff(u, jax.tree.map(jnp.zeros_like, u)) == 0.0
  assert not bool(optax_sam.is_perturbed(state))  # the skipped call left the phase alone
  u, state = tx.update(grad_fn(params), state, params)
  assert bool(optax_sam.is_perturbed(state))
