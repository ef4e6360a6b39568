"""Multi-device SAM on 8 fake CPU devices: pmap, shard_map and jit with sharded arrays.

Every variant runs under ``jax.pmap`` in both calling conventions with global
and local perturbation; ``shard_map`` (with the recipe of docs/distributed.md)
and ``jax.jit`` with sharded arrays run every variant in one-call mode and
representative ones (each correction, F-SAM's EMA) in the other settings.
Results are checked against

* single-device SAM on the whole batch (global perturbation),
* a per-device computation written out below in NumPy from the formulas of
  DESIGN.md (global and local perturbation),
* themselves: params and state must be identical on every device,

and the compiled programs against their collectives: the global one-call
step all-reduces exactly two parameter-sized gradients, and under sharded
jit the step adds nothing parameter-sized to what the gradients need.
"""

import functools
import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sam
from tests import helpers

N = 8  # devices
pytestmark = pytest.mark.devices(N)
PER_DEVICE = 2  # examples per device
LR, MOMENTUM, STEPS = 0.1, 0.9, 3
AXIS = 'data'

# name: (factory taking the distributed/two-phase options, options of the reference below)
VARIANTS = {
  name: (
    lambda v=helpers.VARIANTS[name], **k: v.make(_base(), **k),
    helpers.VARIANTS[name].reference,
  )
  for name in helpers.CORE
}
FRIENDLY = ('fsam', 'fsam+stable')


def _base():
  return optax.sgd(LR, momentum=MOMENTUM)


# ----------------------------------------------------------------------------- the problem


def _problem():
  """Params of a tanh layer and a batch of N * PER_DEVICE examples (NumPy float32)."""
  kx, ky, kw = jax.random.split(jax.random.key(3), 3)
  x = np.asarray(jax.random.normal(kx, (N * PER_DEVICE, 4)), np.float32)
  y = np.asarray(jax.random.normal(ky, (N * PER_DEVICE, 4)), np.float32)
  params = {
    'kernel': np.asarray(0.5 * jax.random.normal(kw, (4, 4)), np.float32),
    'bias': np.full((4,), 0.1, np.float32),
  }
  return params, x, y


PARAMS, X, Y = _problem()
NUM_PARAMS = sum(v.size for v in PARAMS.values())  # 20


def _loss(params, x, y):
  out = jnp.tanh(x @ params['kernel'] + params['bias'])
  return jnp.mean((out - y) ** 2)


def _shards(a):
  """The per-device batches, stacked: shape (N, PER_DEVICE, ...)."""
  return a.reshape((N, PER_DEVICE) + a.shape[1:])


def _max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _assert_close(actual, expected, tol=2e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  assert _max_diff(actual, expected) < tol, _max_diff(actual, expected)


def _assert_same_on_every_device(stacked, rounding=(), skip=()):
  """Every leaf of a per-device stacked tree is bitwise equal on all N devices.

  Leaves whose path contains a name in ``rounding`` may differ by float
  rounding, those with a name in ``skip`` are not compared.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
    where = jax.tree_util.keystr(path)
    if any(name in where for name in skip):
      continue
    leaf = np.asarray(leaf)
    assert leaf.shape[0] == N, where
    for i in range(1, N):
      if any(name in where for name in rounding):
        np.testing.assert_allclose(leaf[i], leaf[0], rtol=1e-6, atol=1e-7, err_msg=where)
      else:
        np.testing.assert_array_equal(leaf[i], leaf[0], err_msg=where)


def _assert_replicas(params, state, two_phase, local):
  """Params and state (stacked per device) agree on every device.

  Bitwise, except in two-phase mode with local perturbation: there the
  descent call returns ``target - (w + e_i)`` and each device adds it to its
  own ``w + e_i``, so the new weights (and the clean weights the next ascent
  saves) agree only up to float rounding, and ``prepared`` holds each
  device's own clean norm or gradient, by design.
  """
  if two_phase and local:
    _assert_same_on_every_device(params, rounding=('',))
    _assert_same_on_every_device(state, rounding=('clean_params',), skip=('prepared',))
  else:
    _assert_same_on_every_device((params, state))


# ------------------------------------------------------- the reference, written out by hand


@jax.jit
def _all_device_grads(w):
  """Each device's gradient on its own PER_DEVICE examples, stacked: (N, ...) leaves."""
  return jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(w, _shards(X), _shards(Y))


def _device_grads(w):
  """The N per-device gradients at float64 NumPy weights, as float64 NumPy dicts."""
  stacked = _all_device_grads({k: np.asarray(v, np.float32) for k, v in w.items()})
  stacked = {k: np.asarray(v, np.float64) for k, v in stacked.items()}
  return [{k: v[i] for k, v in stacked.items()} for i in range(N)]


def _mean(trees):
  return {k: sum(t[k] for t in trees) / len(trees) for k in trees[0]}


def _full_batch_grad(w):
  return _mean(_device_grads(w))


def _norm(tree):
  return np.sqrt(sum(np.sum(v**2) for v in tree.values()))


@functools.cache
def _reference(name, local, steps=STEPS):
  """Parameters after ``steps`` SAM steps of SGD with momentum, from DESIGN.md's formulas.

  Global: one perturbation from the full-batch gradient. Local: device i
  perturbs with its own gradient g_i, computes its own g_adv_i and correction,
  and the corrected gradients are averaged. F-SAM's EMA m always follows the
  full-batch gradient (d_i = g_i - sigma m; at the first step d_i = g_i).
  """
  opts = VARIANTS[name][1]
  rho, eps = opts['rho'], 1e-12
  groups = [_full_batch_grad]
  if local:
    groups = [lambda w, i=i: _device_grads(w)[i] for i in range(N)]

  def scale(w):  # ASAM's T: |w| + eta on the kernel, 1 on the bias
    if not opts.get('adaptive'):
      return {k: 1.0 for k in w}
    return {'kernel': np.abs(w['kernel']) + opts['eta'], 'bias': 1.0}

  w = {k: v.astype(np.float64) for k, v in PARAMS.items()}
  trace = {k: np.zeros_like(v) for k, v in w.items()}
  ema = None
  for _ in range(steps):
    g_sams = []
    for grad in groups:
      g = grad(w)
      d = g
      if opts.get('friendly') and ema is not None:
        d = {k: g[k] - opts['sigma'] * ema[k] for k in g}
      t = scale(w)
      e = {k: rho * t[k] ** 2 * d[k] for k in d}
      if opts.get('normalize', True):
        e = {k: v / (_norm({j: t[j] * d[j] for j in d}) + eps) for k, v in e.items()}
      w_adv = {k: w[k] + e[k] for k in w}
      g_adv = grad(w_adv)
      if opts.get('stable'):
        t_adv = scale(w_adv)
        clean = _norm({k: t[k] * g[k] for k in g})
        adv = _norm({k: t_adv[k] * g_adv[k] for k in g_adv})
        g_sam = {k: v * clean / (adv + eps) for k, v in g_adv.items()}
      elif 'gsam_alpha' in opts:
        coef = sum(np.sum(g[k] * g_adv[k]) for k in g) / (_norm(g_adv) ** 2 + eps)
        g_sam = {k: g_adv[k] - opts['gsam_alpha'] * (g[k] - coef * g_adv[k]) for k in g}
      else:
        g_sam = g_adv
      g_sams.append(g_sam)
    g_sam = _mean(g_sams)
    if opts.get('friendly'):
      g_bar = _full_batch_grad(w)
      lmbda = opts['lmbda']
      ema = g_bar if ema is None else {k: lmbda * ema[k] + (1 - lmbda) * g_bar[k] for k in g_bar}
    trace = {k: g_sam[k] + MOMENTUM * trace[k] for k in w}
    w = {k: w[k] - LR * trace[k] for k in w}
  return w


# ------------------------------------------------------------------------ compiled programs

_COLLECTIVE = re.compile(
  r'=\s*(\([^=]*?\)|\S+)\s+(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\('
)
_SHAPE = re.compile(r'\b[a-z]+[0-9]*\[([0-9,]*)\]')


def _collectives(hlo_text):
  """``{op: [shape of each operand]}`` for the collectives in compiled HLO text.

  XLA may combine several all-reduces into one tuple-shaped op, or split them
  per leaf, so callers count elements, not ops. (CPU programs have no async
  ``-start``/``-done`` pairs.)
  """
  found = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      shapes = [
        tuple(int(d) for d in dims.split(',') if d) for dims in _SHAPE.findall(match.group(1))
      ]
      found.setdefault(match.group(2), []).extend(shapes)
  return found


def _all_reduced(hlo_text):
  """(elements all-reduced in non-scalar operands, number of scalar operands)."""
  shapes = _collectives(hlo_text).get('all-reduce', [])
  return sum(int(np.prod(s)) for s in shapes if s), sum(1 for s in shapes if not s)


def _expected_all_reduced(name, two_phase, local):
  """Parameter-sized elements the SAM step all-reduces over the device axis.

  Global: the clean gradient and the perturbed one (each once per step; in
  two-phase mode one in each branch of the phase's ``cond``). Local: only the
  corrected gradient, plus the clean gradient's average for F-SAM's EMA.
  """
  if not local:
    return 2 * NUM_PARAMS
  return (2 if name in FRIENDLY else 1) * NUM_PARAMS


# ------------------------------------------------------------------------------ the steps


def _pcast_varying(tree):
  """Marks replicated (invariant) values as varying over AXIS: jax.grad then stays local."""
  return jax.lax.pcast(tree, AXIS, to='varying')


def _train_step(tx, two_phase, clean_wrap=None, adv_wrap=None):
  """One call of ``tx.update`` on the loss of this device's batch (x, y).

  ``clean_wrap``/``adv_wrap`` are applied to the params before ``jax.grad`` in
  the clean pass and in ``grad_fn`` (the shard_map recipe uses them).
  """
  clean_wrap = clean_wrap or (lambda p: p)
  adv_wrap = adv_wrap or (lambda p: p)

  def step(params, state, x, y):
    grads = jax.grad(_loss)(clean_wrap(params), x, y)
    if two_phase:
      updates, state = tx.update(grads, state, params)
    else:
      grad_fn = lambda p: jax.grad(_loss)(adv_wrap(p), x, y)
      updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return step


def _calls(two_phase, steps=STEPS):
  return steps * (2 if two_phase else 1)


def _compile_and_run(fn, args, two_phase, carried=2):
  """Compiles ``fn`` once, runs a full training, returns (last outputs, HLO text)."""
  compiled = fn.lower(*args).compile()
  outputs = None
  for _ in range(_calls(two_phase)):
    outputs = compiled(*args)
    args = tuple(outputs[:carried]) + tuple(args[carried:])
  return outputs, compiled.as_text()


@functools.cache
def _single_device(name):
  """The library on one device and the whole batch (one-call mode)."""
  tx = VARIANTS[name][0]()
  (params, _), _ = _compile_and_run(
    jax.jit(_train_step(tx, False)), (PARAMS, tx.init(PARAMS), X, Y), False
  )
  return jax.tree.map(np.asarray, params)


def _replicate(tree):
  return jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (N,) + np.shape(a)), tree)


def _first(stacked):
  return jax.tree.map(lambda a: np.asarray(a)[0], stacked)


def _make(name, two_phase, local, **options):
  return VARIANTS[name][0](axis_name=AXIS, local_perturbation=local, two_phase=two_phase, **options)


def _run_pmap(name, two_phase, local, **options):
  tx = _make(name, two_phase, local, **options)
  step = jax.pmap(_train_step(tx, two_phase), axis_name=AXIS)
  args = (_replicate(PARAMS), _replicate(tx.init(PARAMS)), _shards(X), _shards(Y))
  (params, state), hlo = _compile_and_run(step, args, two_phase)
  return params, state, hlo


def _mesh(shape=(N,), names=(AXIS,), axis_type=None):
  if axis_type is None:  # the default of jax.make_mesh (Explicit axes in recent JAX)
    return jax.make_mesh(shape, names)
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _put(tree, mesh, spec):
  return jax.device_put(tree, NamedSharding(mesh, spec))


def _per_device(tree):
  """Inside shard_map: each device's copy, to be stacked by out_specs=P(AXIS)."""
  return jax.tree.map(lambda a: a[None], tree)


def _run_shard_map(name, two_phase, local, **options):
  """shard_map with check_vma=True and replicated params and state (in/out_specs P()).

  The recipe: jax.grad of params marked varying (pcast) is the local
  gradient. With local perturbation ``w + e_i`` already varies over the axis,
  so ``grad_fn`` needs no cast (and pcast of a varying value is an error).
  Returns (params, per-device stacked (params, state), HLO text).
  """
  tx = _make(name, two_phase, local, **options)
  step = _train_step(
    tx, two_phase, clean_wrap=_pcast_varying, adv_wrap=None if local else _pcast_varying
  )

  def body(params, state, x, y):
    params, state = step(params, state, x, y)
    return params, state, _per_device((params, state))

  mesh = _mesh()
  fn = jax.jit(
    jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=(P(), P(), P(AXIS)),
    )
  )
  args = (_put(PARAMS, mesh, P()), _put(tx.init(PARAMS), mesh, P()))
  args += (_put(X, mesh, P(AXIS)), _put(Y, mesh, P(AXIS)))
  (params, _, stacked), hlo = _compile_and_run(fn, args, two_phase)
  return params, stacked, hlo


def _run_shard_map_per_device_carry(name, two_phase, local):
  """shard_map with check_vma=False, params and state carried per device (like pmap).

  Needed for two-phase local perturbation, where the weights differ across
  devices between the two calls. With check_vma=False jax.grad is local
  without any cast.
  """
  tx = _make(name, two_phase, local)
  step = _train_step(tx, two_phase)

  def body(params, state, x, y):
    squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
    return _per_device(step(squeeze(params), squeeze(state), x, y))

  mesh = _mesh()
  fn = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=(P(AXIS), P(AXIS)), check_vma=False)
  )
  args = (_put(_replicate(PARAMS), mesh, P(AXIS)), _put(_replicate(tx.init(PARAMS)), mesh, P(AXIS)))
  args += (_put(X, mesh, P(AXIS)), _put(Y, mesh, P(AXIS)))
  (params, state), _ = _compile_and_run(fn, args, two_phase)
  return params, state


# ---------------------------------------------------------------------------- references


@pytest.mark.devices(1)  # one device: overrides the module's mark
@pytest.mark.parametrize('name', VARIANTS)
def test_single_device_matches_reference(name):
  """Sanity of the reference itself against the library on one device."""
  _assert_close(_single_device(name), _reference(name, local=False))


@pytest.mark.devices(1)  # one device: overrides the module's mark
@pytest.mark.parametrize('name', VARIANTS)
def test_local_reference_differs_from_global(name):
  """m-sharpness must change the result here, or the local tests would prove nothing."""
  assert _max_diff(_reference(name, local=True), _reference(name, local=False)) > 1e-4


# --------------------------------------------------------------------------------- pmap

MODES = [pytest.param(False, id='one_call'), pytest.param(True, id='two_phase')]
PERTURBATION = [pytest.param(False, id='global'), pytest.param(True, id='local')]


@pytest.mark.parametrize('local', PERTURBATION)
@pytest.mark.parametrize('two_phase', MODES)
@pytest.mark.parametrize('name', VARIANTS)
def test_pmap(name, two_phase, local):
  """Every variant, both conventions, global and local perturbation, under jax.pmap."""
  params, state, hlo = _run_pmap(name, two_phase, local)
  _assert_replicas(params, state, two_phase, local)
  _assert_close(_first(params), _reference(name, local=local))
  if not local:  # the global perturbation is single-device SAM on the whole batch
    _assert_close(_first(params), _single_device(name))
  assert _all_reduced(hlo) == (_expected_all_reduced(name, two_phase, local), 0)  # no scalars
  assert set(_collectives(hlo)) == {'all-reduce'}


# ---------------------------------------------------------------------------- shard_map

SHARD_MAP_VARIANTS = ('usam', 'fsam+stable', 'gsam', 'asam+stable')


@pytest.mark.parametrize('name', VARIANTS)
def test_shard_map_one_call_global(name):
  """The documented recipe (check_vma=True, pcast), every variant."""
  params, stacked, hlo = _run_shard_map(name, False, local=False)
  _assert_same_on_every_device(stacked)
  _assert_close(params, _single_device(name))
  _assert_close(params, _reference(name, local=False))
  assert _all_reduced(hlo) == (2 * NUM_PARAMS, 0)
  assert set(_collectives(hlo)) == {'all-reduce'}


POLICIES = {
  'every': lambda: optax_sam.every(2),
  'ae_sam': lambda: optax_sam.ae_sam(total_steps=10),
}


@pytest.mark.parametrize('run', [_run_pmap, _run_shard_map], ids=['pmap', 'shard_map'])
@pytest.mark.parametrize('policy', POLICIES)
def test_a_policy_all_reduces_the_clean_gradient_once(policy, run):
  """The policy and both branches read one average: 2 gradients all-reduced, as without when=."""
  outputs = run('fsam', False, False, when=POLICIES[policy]())
  assert _all_reduced(outputs[-1]) == (2 * NUM_PARAMS, 0)


@pytest.mark.parametrize('name', SHARD_MAP_VARIANTS)
def test_shard_map_one_call_local(name):
  params, stacked, hlo = _run_shard_map(name, False, local=True)
  _assert_same_on_every_device(stacked)
  _assert_close(params, _reference(name, local=True))
  assert _all_reduced(hlo) == (_expected_all_reduced(name, False, True), 0)


@pytest.mark.parametrize('name', ('fsam+stable', 'gsam'))
def test_shard_map_two_phase_global(name):
  params, stacked, _ = _run_shard_map(name, True, local=False)
  _assert_same_on_every_device(stacked)
  _assert_close(params, _reference(name, local=False))


@pytest.mark.parametrize('name', ('fsam+stable', 'gsam'))
def test_shard_map_two_phase_local_per_device_carry(name):
  params, state = _run_shard_map_per_device_carry(name, True, local=True)
  _assert_replicas(params, state, True, local=True)
  _assert_close(_first(params), _reference(name, local=True))


def test_shard_map_without_the_recipe_sums_gradients():
  """Why the recipe exists: jax.grad of replicated params inside shard_map is already summed.

  Without pcast the clean and perturbed gradients arrive summed over the 8
  devices (invariant), and averaging them again leaves 8x the mean gradient.
  """
  mesh = _mesh()

  def body(params, x, y):
    summed = jax.grad(_loss)(params, x, y)
    local = jax.grad(_loss)(_pcast_varying(params), x, y)
    return summed, jax.lax.pmean(local, AXIS)

  fn = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()))
  )
  summed, mean = fn(_put(PARAMS, mesh, P()), _put(X, mesh, P(AXIS)), _put(Y, mesh, P(AXIS)))
  full = _full_batch_grad({k: v.astype(np.float64) for k, v in PARAMS.items()})
  _assert_close(mean, full)
  _assert_close(summed, {k: N * v for k, v in full.items()}, tol=1e-5)


# ------------------------------------------------------------------- jit with sharded arrays

# name: (mesh shape, mesh axis names, axis type (None: jax.make_mesh's default), params' specs)
LAYOUTS = {
  # data parallel: batch split over 8 devices, params replicated
  'replicated': ((N,), ('batch',), jax.sharding.AxisType.Auto, {'kernel': P(), 'bias': P()}),
  # batch over 4 devices, the layer's outputs over 2
  'model_sharded': (
    (4, 2),
    ('batch', 'model'),
    None,
    {'kernel': P(None, 'model'), 'bias': P('model')},
  ),
}
JIT_CASES = (
  [(name, False, 'model_sharded') for name in VARIANTS]
  + [(name, True, 'model_sharded') for name in ('fsam+stable', 'gsam', 'asam+stable')]
  + [('sam', False, 'replicated'), ('fsam', False, 'replicated'), ('gsam', True, 'replicated')]
)


def _sharded_inputs(layout):
  shape, names, axis_type, specs = LAYOUTS[layout]
  mesh = _mesh(shape, names, axis_type)
  params = {k: _put(v, mesh, specs[k]) for k, v in PARAMS.items()}
  return params, _put(X, mesh, P('batch')), _put(Y, mesh, P('batch'))


def _jit_step(tx, sam, two_phase):
  """value_and_grad, then ``tx.update`` (a plain optax step when not ``sam``); returns the loss."""

  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    if sam and not two_phase:
      grad_fn = lambda p: jax.grad(_loss)(p, x, y)
      updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    else:
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step)


@functools.cache
def _base_step_hlo(layout):
  params, x, y = _sharded_inputs(layout)
  tx = _base()
  return _jit_step(tx, False, False).lower(params, tx.init(params), x, y).compile().as_text()


def _param_shaped(tree):
  """(path, leaf, the param it follows) for every leaf of ``tree`` shaped like a param."""
  by_shape = {v.shape: k for k, v in PARAMS.items()}
  return [
    (jax.tree_util.keystr(path), leaf, by_shape[leaf.shape])
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if leaf.shape in by_shape
  ]


def _assert_shardings_follow(tree, params):
  leaves = _param_shaped(tree)
  assert leaves
  for where, leaf, key in leaves:
    expected = params[key].sharding
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (where, leaf.sharding, expected)


@pytest.mark.parametrize('name, two_phase, layout', JIT_CASES)
def test_sharded_jit(name, two_phase, layout):
  """No axis_name: gradients are global, so the perturbation is global.

  The compiled executable only accepts arguments with the shardings it was
  compiled for, so running it on its own outputs checks that params and state
  keep their shardings across steps; the HLO check shows the step adds no
  resharding: only the gradients' all-reduces (twice the base step's per
  one-call step) and scalar ones (loss, norms), nothing parameter-sized else.
  """
  params, x, y = _sharded_inputs(layout)
  tx = VARIANTS[name][0](two_phase=two_phase)
  state = tx.init(params)
  (new_params, new_state, _), hlo = _compile_and_run(
    _jit_step(tx, True, two_phase), (params, state, x, y), two_phase
  )
  _assert_close(new_params, _reference(name, local=False))
  if not two_phase:
    _assert_close(new_params, _single_device(name))
  _assert_shardings_follow((new_params, new_state), params)
  base = _collectives(_base_step_hlo(layout))
  sam = _collectives(hlo)
  assert set(sam) == set(base) == {'all-reduce'}, sam
  calls_per_step = 1 if two_phase else 2  # gradients per compiled call
  assert _all_reduced(hlo)[0] == calls_per_step * _all_reduced(_base_step_hlo(layout))[0]


@pytest.mark.parametrize('two_phase', MODES)
@pytest.mark.parametrize('name', VARIANTS)
def test_eager_init_state_follows_param_shardings(name, two_phase):
  params, _, _ = _sharded_inputs('model_sharded')
  _assert_shardings_follow(VARIANTS[name][0](two_phase=two_phase).init(params), params)


# ---------------------------------------------------------------------- docs and example

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'distributed.md'
EXAMPLE = ROOT / 'optax_sam' / 'examples' / 'data_parallel.py'
MICRO_BATCHES_HEADING = '## m-sharpness on any number of devices'


def test_docs_snippets_run_and_agree():
  """docs/distributed.md's snippets run in order; the global ones give the same params."""
  text = DOC.read_text().split(MICRO_BATCHES_HEADING)[0]  # that section: test_micro_batches.py
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
  assert len(blocks) == 6
  namespace = {'__name__': 'distributed_doc'}
  exec(compile(blocks[0], str(DOC), 'exec'), namespace)
  initial = float(namespace['loss_fn'](namespace['params0'], namespace['host_batch']))
  results = {}
  for label, block in zip(('jit', 'shard_map', 'local', 'no_vma', 'pmap'), blocks[1:], strict=True):
    exec(compile(block, str(DOC), 'exec'), namespace)
    results[label] = jax.tree.map(np.asarray, namespace['params'])
    assert float(np.mean(namespace['loss'])) < initial, label
    if label in ('shard_map', 'pmap'):  # the gradients twice, and the loss for logging
      args = (namespace['params'], namespace['opt_state'])
      args += (namespace['per_device_batch'] if label == 'pmap' else namespace['batch'],)
      hlo = namespace['train_step'].lower(*args).compile().as_text()
      assert _all_reduced(hlo) == (2 * 5, 1), label  # 5 parameters, 1 scalar loss
  results['pmap'] = _first(results['pmap'])
  for label in ('shard_map', 'no_vma', 'pmap'):
    _assert_close(results[label], results['jit'], tol=1e-5)
  assert _max_diff(results['local'], results['jit']) > 1e-4


def test_data_parallel_example_runs():
  """The example script's main, on the 8 fake devices, a few steps."""
  spec = importlib.util.spec_from_file_location('data_parallel_example', EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  losses = example.main(['--steps', '4', '--batch-size', '32'])
  assert losses['jit'][-1] < losses['jit'][0]
  _assert_close(losses['shard_map'], losses['jit'], tol=1e-5)  # global: the same algorithm
  _, local = example.train('shard_map', steps=4, batch_size=32, local_perturbation=True)
  assert local[0] == pytest.approx(losses['jit'][0])  # same start, then m-sharpness
  assert abs(local[-1] - losses['jit'][-1]) > 1e-6
