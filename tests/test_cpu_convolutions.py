"""Convolutions in XLA:CPU's canonical order inside control flow: same values, fast kernels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sam
from optax_sam import sharpness
from optax_sam._src import cpu_convolutions
from tests import helpers

# XLA:CPU's canonical order: batch-spatial-feature input and output, spatial-in-out kernel.
CANONICAL = {'b0f_0io->b0f', 'b01f_01io->b01f', 'b012f_012io->b012f'}


def _conv(x, k, dimension_numbers, **kwargs):
  kwargs.setdefault('window_strides', (1,) * (x.ndim - 2))
  kwargs.setdefault('padding', 'SAME')
  return lax.conv_general_dilated(x, k, dimension_numbers=dimension_numbers, **kwargs)


# (input shape, kernel shape, dimension numbers, options): 1-D, 2-D and 3-D, channels first,
# last and mixed, strides, dilations, grouped and depthwise (whose gradients have
# batch_group_count > 1).
CONVS = {
  'nwc': ((2, 9, 3), (3, 3, 4), ('NWC', 'WIO', 'NWC'), {}),
  'ncw': ((2, 3, 9), (4, 3, 3), ('NCW', 'OIW', 'NCW'), {}),
  'nhwc-strided': (
    (2, 7, 6, 3),
    (3, 2, 3, 5),
    ('NHWC', 'HWIO', 'NHWC'),
    {'window_strides': (2, 1)},
  ),
  'nchw-dilated': (
    (2, 3, 7, 6),
    (5, 3, 3, 2),
    ('NCHW', 'OIHW', 'NCHW'),
    {'rhs_dilation': (2, 1), 'lhs_dilation': (1, 2), 'padding': ((1, 1), (0, 2))},
  ),
  'grouped': ((2, 8, 4), (3, 2, 6), ('NWC', 'WIO', 'NWC'), {'feature_group_count': 2}),
  'mixed-orders': ((2, 3, 7, 6), (3, 2, 3, 5), ('NCHW', 'HWIO', 'NHWC'), {}),
  'cnw': ((3, 2, 9), (3, 3, 4), ('CNW', 'WIO', 'WNC'), {}),
  'ndhwc-3d': ((2, 5, 4, 3, 2), (2, 2, 2, 2, 3), ('NDHWC', 'DHWIO', 'NDHWC'), {}),
  'depthwise-nchw': (
    (2, 4, 6, 5),
    (4, 1, 3, 3),
    ('NCHW', 'OIHW', 'NCHW'),
    {'feature_group_count': 4},
  ),
}


def _operands(name):
  x_shape, k_shape, dims, kwargs = CONVS[name]
  kx, kk = jax.random.split(jax.random.key(len(name)))
  x, k = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
  loss = lambda x, k: jnp.sum(jnp.sin(_conv(x, k, dims, **kwargs)))
  return x, k, loss


def _dim_labels(hlo_text):
  return re.findall(r'dim_labels=(\S+?)[,}\s]', hlo_text)


def _compiled_convolutions(fn, *args):
  labels = _dim_labels(jax.jit(fn).lower(*args).compile().as_text())
  assert labels, 'no convolution in the compiled program'
  return labels


def _in_cond(fn):
  """``fn`` in the taken branch of a conditional (the other branch gives zeros)."""
  zeros = lambda *a: jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, *a))
  return lambda flag, *a: lax.cond(flag, fn, zeros, *a)


@pytest.mark.parametrize('name', CONVS)
def test_values_equal_the_function_s_forward_and_gradients(name):
  x, k, loss = _operands(name)
  for fn in (loss, jax.grad(loss, argnums=(0, 1))):
    want = fn(x, k)
    got = jax.jit(_in_cond(cpu_convolutions.canonical(fn)))(True, x, k)
    np.testing.assert_allclose(
      np.concatenate([np.ravel(a) for a in jax.tree.leaves(got)]),
      np.concatenate([np.ravel(a) for a in jax.tree.leaves(want)]),
      rtol=1e-5,
      atol=1e-5,
    )


@pytest.mark.parametrize('name', ['nwc', 'nhwc-strided', 'ncw'])
def test_every_convolution_of_a_gradient_in_a_conditional_is_canonical(name):
  x, k, loss = _operands(name)
  grad = jax.grad(loss, argnums=(0, 1))
  labels = _compiled_convolutions(_in_cond(cpu_convolutions.canonical(grad)), True, x, k)
  assert set(labels) <= CANONICAL, labels
  # Without the rewrite the gradient's convolutions keep their order in the branch (the XLA:CPU
  # behaviour this module works around; if this fails, XLA canonicalizes branches itself now).
  assert not set(_compiled_convolutions(_in_cond(grad), True, x, k)) <= CANONICAL


def test_jitted_calls_are_inlined_and_effects_kept():
  x, k, loss = _operands('ncw')
  calls = []

  def fn(x, k):
    jax.debug.callback(lambda: calls.append(1))
    return jax.jit(jax.grad(loss, argnums=1))(x, k)

  rewritten = _in_cond(cpu_convolutions.canonical(fn))
  assert set(_compiled_convolutions(rewritten, True, x, k)) <= CANONICAL
  step = jax.jit(rewritten)
  for flag in (True, False, True):
    jax.block_until_ready(step(flag, x, k))
  jax.effects_barrier()
  assert len(calls) == 2
  np.testing.assert_allclose(step(True, x, k), jax.grad(loss, argnums=1)(x, k), rtol=1e-5)


def test_pytrees_keyword_arguments_closures_and_differentiation():
  x, k, loss = _operands('nhwc-strided')

  @jax.jit
  def outer(x, k, scale):  # the function closes over a traced ``scale``
    fn = lambda params, *, offset: {'y': scale * loss(params['x'], params['k']) + offset}
    return cpu_convolutions.canonical(fn)({'x': x, 'k': k}, offset=1.0)['y']

  np.testing.assert_allclose(outer(x, k, 2.0), 2.0 * loss(x, k) + 1.0, rtol=1e-5)
  np.testing.assert_allclose(
    jax.grad(outer, argnums=1)(x, k, 2.0),
    2.0 * jax.grad(loss, argnums=1)(x, k),
    rtol=1e-5,
    atol=1e-5,
  )


def _lowered_dimension_numbers(fn, platform, *args):
  """The convolutions' dimension numbers in ``fn``'s StableHLO lowered for ``platform``."""
  module = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
  return re.findall(r'dim_numbers = (\[[^\]]*\]x\[[^\]]*\]->\[[^\]]*\])', module)


def test_the_choice_is_made_for_the_platform_lowered_for():
  """Lowered for a GPU (here, without one), the branch keeps the function's own convolutions."""
  x, k, loss = _operands('ncw')
  grad = _in_cond(jax.grad(loss, argnums=1))
  rewritten = _in_cond(cpu_convolutions.canonical(jax.grad(loss, argnums=1)))
  own = _lowered_dimension_numbers(grad, 'cuda', True, x, k)
  assert own and _lowered_dimension_numbers(rewritten, 'cuda', True, x, k) == own
  on_cpu = _lowered_dimension_numbers(rewritten, 'cpu', True, x, k)
  assert on_cpu != own and all(d.startswith('[b, 0, f]') for d in on_cpu), on_cpu


def test_users_can_opt_out(monkeypatch):
  x, k, loss = _operands('ncw')
  grad = jax.grad(loss, argnums=1)
  text = lambda fn: str(jax.make_jaxpr(fn)(x, k))
  assert text(cpu_convolutions.canonical(grad)) != text(grad)
  monkeypatch.setenv(cpu_convolutions.OPT_OUT, '0')
  assert not cpu_convolutions.enabled()
  assert text(cpu_convolutions.canonical(grad)) == text(grad)
  assert not set(
    _compiled_convolutions(_in_cond(cpu_convolutions.canonical(grad)), True, x, k)
  ) <= (CANONICAL)


def test_the_rewrite_retires_itself_from_the_version_that_fixes_xla_cpu(monkeypatch):
  """XLA:CPU still leaves convolutions in branches unrewritten: if not, set XLA_CPU_FIXED_IN."""
  x, k, loss = _operands('nchw-dilated')
  labels = _compiled_convolutions(_in_cond(jax.grad(loss, argnums=(0, 1))), True, x, k)
  assert not set(labels) <= CANONICAL, (
    'XLA:CPU canonicalizes convolutions inside control flow in this jaxlib: set '
    'cpu_convolutions.XLA_CPU_FIXED_IN to its version, so that the rewrite retires itself.'
  )
  assert cpu_convolutions.enabled()
  monkeypatch.setattr(cpu_convolutions, 'XLA_CPU_FIXED_IN', (0, 0, 1))
  assert not cpu_convolutions.enabled()


def test_the_jax_names_the_rewrite_relies_on():
  """The rewrite reads JAX internals (primitives, a placeholder's type name, eqn contexts)."""
  assert cpu_convolutions._conv_p.name == 'conv_general_dilated'
  assert cpu_convolutions._jit_p.name in ('jit', 'pjit')
  jaxpr = jax.make_jaxpr(jax.jit(lambda a: a + 1))(1.0)
  (eqn,) = jaxpr.jaxpr.eqns
  assert cpu_convolutions._inlinable(eqn)  # jit's "no sharding given" placeholder is recognized
  assert hasattr(eqn.ctx, 'manager') and hasattr(eqn.source_info, 'name_stack')
  assert isinstance(eqn.primitive.get_bind_params(eqn.params), (tuple, dict))


def test_static_leaves_reach_the_function_as_they_are():
  x, k, loss = _operands('nwc')

  def fn(params, batch):
    scale = 0.5 if batch['train'] else 2.0  # a Python flag and a Python int in the batch
    return scale * loss(batch['x'][:, : batch['n']], params)

  batch = {'x': x, 'train': True, 'n': 7, 'name': 'digits', 'mask': np.ones(3)}
  got = jax.jit(lambda k: cpu_convolutions.canonical(fn)(k, batch))(k)
  np.testing.assert_allclose(got, fn(k, batch), rtol=1e-5)
  trace = sharpness.hessian_trace(fn, k, batch, key=jax.random.key(0), num_probes=2)
  assert np.isfinite(trace.estimate)


@pytest.mark.devices(2)
def test_explicit_output_shardings_and_sharded_jit_calls_are_kept():
  if not hasattr(jax, 'set_mesh'):
    pytest.skip('needs jax.set_mesh')
  mesh = jax.make_mesh((2,), ('x',), axis_types=(AxisType.Explicit,))
  x, k = jnp.ones((2, 4, 8)), jnp.ones((4, 4, 3))
  conv = lambda x, k: lax.conv_general_dilated(
    x, k, (1,), 'SAME', dimension_numbers=('NCW', 'OIW', 'NCW'), out_sharding=P(None, 'x', None)
  )
  inner = jax.jit(lambda a: 2 * a, out_shardings=NamedSharding(mesh, P('x')))
  with jax.set_mesh(mesh):
    x, k = jax.device_put(x, P()), jax.device_put(k, P())
    assert jax.typeof(jax.jit(cpu_convolutions.canonical(conv))(x, k)) == jax.typeof(
      jax.jit(conv)(x, k)
    )
  sharded = lambda fn: jax.jit(fn).lower(jnp.ones(8)).compile().output_shardings
  assert sharded(cpu_convolutions.canonical(inner)) == sharded(inner)


# ------------------------------------------------------------------ where optax_sam uses it


def _cnn():
  """A two-layer 1-D CNN's params, a batch, and the gradient of its loss(params, batch)."""
  k1, k2, kd, kx, ky = jax.random.split(jax.random.key(0), 5)
  params = {
    'conv_0': 0.3 * jax.random.normal(k1, (3, 2, 4)),
    'conv_1': 0.3 * jax.random.normal(k2, (3, 4, 4)),
    'dense': 0.3 * jax.random.normal(kd, (4,)),
  }
  batch = (jax.random.normal(kx, (8, 12, 2)), jax.random.normal(ky, (8,)))

  def loss(p, batch):
    x, y = batch
    h = jax.nn.relu(_conv(x, p['conv_0'], ('NWC', 'WIO', 'NWC')))
    h = jax.nn.relu(_conv(h, p['conv_1'], ('NWC', 'WIO', 'NWC')))
    return jnp.mean((jnp.mean(h, axis=1) @ p['dense'] - y) ** 2)

  return params, batch, loss


@pytest.mark.parametrize(
  'case',
  [
    'every',
    'look_sam',
    'micro_batches-scan',
    'micro_batches-scan-every',
    'accumulated',
    'bsam-scan',
  ],
)
def test_the_second_gradient_s_convolutions_are_canonical_where_sam_runs_them_in_control_flow(
  case, monkeypatch
):
  params, batch, loss = _cnn()
  grad = jax.grad(loss)
  base = optax.sgd(0.1, momentum=0.9)
  tx = {
    'every': optax_sam.sam(base, rho=0.05, when=optax_sam.every(2)),
    'look_sam': optax_sam.look_sam(base, rho=0.05, k=2),
    'micro_batches-scan': optax_sam.sam(base, rho=0.05),
    'micro_batches-scan-every': optax_sam.sam(base, rho=0.05, when=optax_sam.every(2)),
    'accumulated': optax_sam.sam(base, rho=0.05),
    'bsam-scan': optax_sam.bsam(0.1, data_size=100.0),
  }[case]
  state = tx.init(params)

  def new_step():  # a new function each time: jit caches traces by function
    def step(params, state, batch):
      if case.startswith('micro_batches') or case == 'bsam-scan':
        groups = optax_sam.micro_batches(grad, batch, group_size=4)
        return tx.update(None, state, params, grad_fn=groups)
      if case == 'accumulated':
        acc = optax_sam.accumulated_grad_fn(grad, batch, micro_batch_size=4)
        return tx.update(acc(params), state, params, grad_fn=acc)
      grad_fn = lambda p: grad(p, batch)
      return tx.update(grad_fn(params), state, params, grad_fn=grad_fn)

    return step

  assert set(_compiled_convolutions(new_step(), params, state, batch)) <= CANONICAL
  with_rewrite = jax.jit(new_step())(params, state, batch)
  # Without the rewrite: convolutions out of order, and the same step.
  monkeypatch.setattr(cpu_convolutions, 'canonical', lambda fn: fn)
  assert not set(_compiled_convolutions(new_step(), params, state, batch)) <= CANONICAL
  assert helpers.max_diff(with_rewrite, jax.jit(new_step())(params, state, batch)) < 1e-6


@pytest.mark.parametrize('estimator', ['eigenvalues', 'trace', 'worst_case', 'chunked'])
def test_the_sharpness_estimators_loops_run_canonical_convolutions(estimator, monkeypatch):
  params, batch, loss = _cnn()
  key = jax.random.key(1)
  run = {
    'eigenvalues': lambda p, b: sharpness.hessian_eigenvalues(loss, p, b, key=key, num_steps=3),
    'trace': lambda p, b: sharpness.hessian_trace(loss, p, b, key=key, num_probes=4),
    'worst_case': lambda p, b: sharpness.worst_case_sharpness(
      loss, p, b, key=key, rho=0.05, num_steps=2
    ),
    'chunked': lambda p, b: sharpness.hessian_eigenvalues(
      loss, p, b, key=key, num_steps=3, num_chunks=2
    ),
  }[estimator]
  assert set(_compiled_convolutions(run, params, batch)) <= CANONICAL
  with_rewrite = jax.jit(run)(params, batch)
  monkeypatch.setattr(cpu_convolutions, 'canonical', lambda fn: fn)
  jax.clear_caches()  # the estimators keep their compiled programs: trace them anew
  again = lambda p, b: run(p, b)  # a new function, traced anew
  assert not set(_compiled_convolutions(again, params, batch)) <= CANONICAL
  without = jax.jit(again)(params, batch)
  for a, b in zip(jax.tree.leaves(with_rewrite), jax.tree.leaves(without), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_rewrite_traces_grad_fn_no_more_often(monkeypatch):
  params, batch, loss = _cnn()
  tx = optax_sam.sam(optax.sgd(0.1), rho=0.05, when=optax_sam.every(2))

  def traces():
    count = []

    def grad(p, b):
      count.append(1)  # Python runs once per trace
      return jax.grad(loss)(p, b)

    acc = optax_sam.accumulated_grad_fn(grad, batch, micro_batch_size=4)
    jax.jit(lambda p, s: tx.update(acc(p), s, p, grad_fn=acc)).lower(params, tx.init(params))
    return len(count)

  rewritten = traces()
  monkeypatch.setattr(cpu_convolutions, 'canonical', lambda fn: fn)
  assert rewritten == traces()
