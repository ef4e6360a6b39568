"""``when=`` policies: SAM on some steps only, without evaluating ``grad_fn`` on the others."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sam
from tests import helpers

ALIASES = {n: helpers.VARIANTS[n].make for n in ('sam', 'fsam', 'stablesam', 'gsam', 'asam')}


def _base():
  return optax.sgd(0.1, momentum=0.9)


def _run(tx, params, grad_fn, steps, two_phase=False):
  """``steps`` jitted updates (calls); returns the params, the state and the params of each call."""
  state = tx.init(params)

  @jax.jit
  def call(params, state):
    u, state = tx.update(grad_fn(params), state, params, **helpers.grad_fn_for(state, grad_fn))
    return optax.apply_updates(params, u), state

  trajectory = []
  for _ in range(steps):
    params, state = call(params, state)
    trajectory.append(params)
  return params, state, trajectory


def _counting(grad_fn):
  """``grad_fn`` that counts its executions (not its traces) with a debug callback."""
  calls = []

  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return grad_fn(p)

  return counted, calls


# ------------------------------------------------------------------------------ policies


def test_every_and_after_decide_by_the_count():
  g = jnp.ones(3)
  for policy, want in (
    (optax_sam.every(1), [True] * 6),
    (optax_sam.every(4), [True, False, False, False, True, False]),
    (optax_sam.after(0), [True] * 6),
    (optax_sam.after(4), [False] * 4 + [True] * 2),
  ):
    state, got = policy.init(), []
    for _ in range(6):
      take, state = jax.jit(policy.decide)(g, state)
      got.append(bool(take))
    assert got == want


def test_randomly_is_reproducible_and_has_its_probability():
  def draws(p, seed, n=2000):
    policy = optax_sam.randomly(p, seed)

    def body(state, _):
      take, state = policy.decide(jnp.ones(2), state)
      return state, take

    return np.asarray(jax.lax.scan(body, policy.init(), None, length=n)[1])

  a, b, c = draws(0.3, 1), draws(0.3, 1), draws(0.3, 2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert abs(a.mean() - 0.3) < 0.04  # 4 standard deviations at n = 2000
  assert not draws(0.0, 0).any() and draws(1.0, 0).all()


def test_ae_sam_matches_its_formula():
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=5) * scale for scale in rng.uniform(0.5, 2.0, size=40)]
  total, delta, l1, l2 = 30, 0.8, -0.5, 1.5
  policy = optax_sam.ae_sam(total, delta=delta, lambda1=l1, lambda2=l2)
  state, mean, var, got, want = policy.init(), 0.0, 0.0, [], []
  for t, g in enumerate(grads):
    take, state = jax.jit(policy.decide)(jnp.asarray(g, jnp.float32), state)
    got.append(bool(take))
    s = float(np.sum(g**2))
    mean = delta * mean + (1 - delta) * s
    var = delta * var + (1 - delta) * (s - mean) ** 2
    c = l1 + (l2 - l1) * min(t / total, 1.0)
    want.append(s >= mean + c * np.sqrt(var))
    np.testing.assert_allclose(float(state.mean), mean, rtol=1e-5)
  assert got == want
  assert 0 < sum(got) < len(got)  # it chose both kinds


# ------------------------------------------------------------------- equalities of steps


@pytest.mark.parametrize('two_phase', [False, True])
@pytest.mark.parametrize('name', sorted(ALIASES))
def test_every_one_is_the_alias_without_when(name, two_phase):
  params, _, grad_fn = helpers.problem()
  calls = 6 if two_phase else 3
  want = _run(ALIASES[name](_base(), two_phase=two_phase), params, grad_fn, calls)[0]
  tx = ALIASES[name](_base(), two_phase=two_phase, when=optax_sam.every(1))
  got = _run(tx, params, grad_fn, calls)[0]
  assert helpers.max_diff(got, want) < 1e-6  # the branch may fuse differently: float rounding


@pytest.mark.parametrize('name', ['sam', 'stablesam', 'gsam', 'asam'])
def test_every_k_is_sam_and_base_steps_interleaved_by_hand(name):
  """Steps 0, 3, 6 are the alias's SAM steps, the others the base optimizer's, one base state."""
  params, _, grad_fn = helpers.problem()
  base = _base()
  sam = ALIASES[name](base)
  sam_update = jax.jit(lambda g, s, p: sam.update(g, s, p, grad_fn=grad_fn))
  state, w = sam.init(params), params
  for step in range(8):
    g = grad_fn(w)
    if step % 3 == 0:
      u, state = sam_update(g, state, w)
    else:
      u, base_state = base.update(g, state.base_state, w)
      state = state._replace(base_state=base_state)
    w = optax.apply_updates(w, u)
  got = _run(ALIASES[name](base, when=optax_sam.every(3)), params, grad_fn, 8)[0]
  assert helpers.max_diff(got, w) < 1e-6
  assert helpers.max_diff(got, _run(sam, params, grad_fn, 8)[0]) > 1e-4  # not SAM throughout


@pytest.mark.parametrize('name', ['sam', 'fsam', 'gsam'])
@pytest.mark.parametrize('policy', ['every', 'after', 'random'])
def test_two_phase_with_when_equals_one_call(name, policy):
  """A plain step is one call in two-phase mode; after each step the params agree."""
  make = {
    'every': lambda: optax_sam.every(3),
    'after': lambda: optax_sam.after(2),
    'random': lambda: optax_sam.randomly(0.5, seed=3),
  }[policy]
  params, _, grad_fn = helpers.problem()
  one_call = _run(ALIASES[name](_base(), when=make()), params, grad_fn, 6)[2]
  tx = ALIASES[name](_base(), two_phase=True, when=make())
  state, w, trajectory = tx.init(params), params, []
  step = jax.jit(lambda w, s: tx.update(grad_fn(w), s, w))
  while len(trajectory) < 6:
    u, state = step(w, state)
    w = optax.apply_updates(w, u)
    if not bool(optax_sam.is_perturbed(state)):
      trajectory.append(w)
  for got, want in zip(trajectory, one_call, strict=True):
    assert helpers.max_diff(got, want) < 1e-5


# ------------------------------------------------------------- grad_fn is not evaluated


@pytest.mark.parametrize(
  'make, steps, want',
  [
    (lambda: optax_sam.every(3), 7, 3),
    (lambda: optax_sam.after(4), 6, 2),
    (lambda: optax_sam.every(1), 4, 4),
  ],
)
def test_plain_steps_do_not_evaluate_grad_fn_under_jit(make, steps, want):
  params, _, grad_fn = helpers.problem()
  counted, calls = _counting(grad_fn)
  tx = optax_sam.sam(_base(), when=make())
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=counted))
  for _ in range(steps):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  jax.effects_barrier()
  assert len(calls) == want


@pytest.mark.parametrize('policy', ['random', 'ae_sam'])
def test_grad_fn_runs_exactly_on_the_steps_the_policy_chose(policy):
  """A new batch each step, so that AE-SAM's squared gradient norm goes up and down."""
  make = {
    'random': lambda: optax_sam.randomly(0.4, seed=0),
    'ae_sam': lambda: optax_sam.ae_sam(total_steps=12),
  }[policy]
  params, _, _ = _data()
  calls = []

  def grad_fn(q, x, y):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(_loss)(q, x, y)

  tx = optax_sam.friendly_sam(_base(), when=make())
  state = tx.init(params)
  step = jax.jit(
    lambda p, s, x, y: tx.update(jax.grad(_loss)(p, x, y), s, p, grad_fn=lambda q: grad_fn(q, x, y))
  )
  decide = jax.jit(make().decide)
  chosen, policy_state = 0, make().init()
  for t in range(12):
    kx, ky = jax.random.split(jax.random.key(t))
    x, y = jax.random.normal(kx, (4, 5)), jax.random.normal(ky, (4, 3))
    take, policy_state = decide(jax.grad(_loss)(params, x, y), policy_state)
    chosen += int(take)
    u, state = step(params, state, x, y)
    params = optax.apply_updates(params, u)
  jax.effects_barrier()
  assert 0 < chosen < 12
  assert len(calls) == chosen


def test_look_sam_evaluates_grad_fn_every_k_steps():
  params, _, grad_fn = helpers.problem()
  counted, calls = _counting(grad_fn)
  tx = optax_sam.look_sam(_base(), k=5)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=counted))
  for _ in range(11):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  jax.effects_barrier()
  assert len(calls) == 3  # steps 0, 5, 10


# -------------------------------------------------------- what the states do on plain steps


def test_friendly_ema_tracks_g_on_plain_steps():
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.friendly_sam(_base(), sigma=0.5, lmbda=0.9, when=optax_sam.every(2))
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  for _ in range(3):  # steps 0 (SAM), 1 (plain), 2 (SAM)
    ema = state.perturbation_state[0].ema
    g = grad_fn(params)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  want = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, ema, g)
  assert helpers.max_diff(state.perturbation_state[0].ema, want) < 1e-6
  assert int(state.perturbation_state[0].count) == 3


# ------------------------------------------------------------------------ axis_name

N, AXIS = 8, 'data'


def _loss(p, x, y):
  return jnp.mean((jnp.tanh(x @ p['kernel'] + p['bias']) - y) ** 2)


def _data():
  kx, ky, kp = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (4 * N, 5))
  y = jax.random.normal(ky, (4 * N, 3))
  params = {'kernel': 0.5 * jax.random.normal(kp, (5, 3)), 'bias': jnp.zeros(3)}
  return params, x, y


def _stack(tree):
  return jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (N,) + np.shape(a)), tree)


@pytest.mark.devices(8)
@pytest.mark.parametrize('local', [False, True])
@pytest.mark.parametrize('policy', ['ae_sam', 'random', 'look_sam'])
def test_every_device_takes_the_same_branch(policy, local):
  """shard_map on 8 devices, each with its own batch; per-device params and state.

  ``grad_fn`` records which device evaluated it: on each step either all 8
  devices do (a SAM step) or none (a plain step).
  """
  make = {
    'ae_sam': lambda **k: optax_sam.sam(_base(), when=optax_sam.ae_sam(total_steps=10), **k),
    'random': lambda **k: optax_sam.sam(_base(), when=optax_sam.randomly(0.5, seed=1), **k),
    'look_sam': lambda **k: optax_sam.look_sam(_base(), k=3, **k),
  }[policy]
  params, x, y = _data()
  tx = make(axis_name=AXIS, local_perturbation=local)
  devices = []

  def grad_fn(q, x, y):
    jax.debug.callback(lambda i: devices.append(int(i)), jax.lax.axis_index(AXIS))
    return jax.grad(_loss)(q, x, y)

  def step(p, s, x, y):
    p, s = jax.tree.map(lambda a: a[0], (p, s))
    grads = jax.grad(_loss)(p, x, y)
    u, s = tx.update(grads, s, p, grad_fn=lambda q: grad_fn(q, x, y))
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  mesh = jax.make_mesh((N,), (AXIS,))
  fn = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=(P(AXIS), P(AXIS)), check_vma=False)
  )
  put = lambda t: jax.device_put(t, NamedSharding(mesh, P(AXIS)))
  p, s = put(_stack(params)), put(_stack(tx.init(params)))
  xs, ys = put(x), put(y)
  sam_steps = 0
  for _ in range(10):
    p, s = fn(p, s, xs, ys)
    jax.effects_barrier()
    assert sorted(devices) in ([], list(range(N)))
    sam_steps += bool(devices)
    devices.clear()
    for leaf in jax.tree.leaves((p, s)):  # all devices hold the same params and state
      leaf = np.asarray(leaf)
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
  assert 0 < sam_steps < 10
  if not local:  # equal to one device on the whole batch
    single = make()
    grad = lambda q: jax.grad(_loss)(q, x, y)
    update = jax.jit(lambda w, s: single.update(grad(w), s, w, grad_fn=grad))
    w, state = params, single.init(params)
    for _ in range(10):
      u, state = update(w, state)
      w = optax.apply_updates(w, u)
    assert helpers.max_diff(jax.tree.map(lambda a: np.asarray(a)[0], p), w) < 1e-5


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
  'make, message',
  [
    (lambda: optax_sam.every(0), 'k must be an integer >= 1'),
    (lambda: optax_sam.every(2.5), 'k must be an integer >= 1'),
    (lambda: optax_sam.after(-1), 'n must be an integer >= 0'),
    (lambda: optax_sam.randomly(1.5, seed=0), r'p must be in \[0.0, 1.0\]'),
    (lambda: optax_sam.randomly(-0.1, seed=0), r'p must be in \[0.0, 1.0\]'),
    (lambda: optax_sam.ae_sam(0), 'total_steps must be an integer >= 1'),
    (lambda: optax_sam.ae_sam(10, delta=1.5), r'delta must be in \[0.0, 1.0\]'),
    (lambda: optax_sam.look_sam(optax.sgd(0.1), k=0), 'k must be an integer >= 1'),
    (lambda: optax_sam.look_sam(optax.sgd(0.1), alpha=-0.1), 'alpha must be >= 0'),
  ],
)
def test_bad_input_names_the_parameter_and_its_range(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize('two_phase', [False, True])
def test_statistics_on_a_plain_step_record_the_clean_norm(two_phase):
  params, _, grad_fn = helpers.problem()
  tx = optax_sam.sam(_base(), statistics=True, two_phase=two_phase, when=optax_sam.after(1))
  g = grad_fn(params)
  state = tx.init(params)
  _, state = tx.update(g, state, params, **helpers.grad_fn_for(state, grad_fn))  # step 0: plain
  stats = optax_sam.step_statistics(state)
  assert float(stats.grad_norm) == pytest.approx(float(optax.tree.norm(g)), rel=1e-6)
  assert float(stats.adv_grad_norm) == 0.0 and float(stats.perturbation_norm) == 0.0
