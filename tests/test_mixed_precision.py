"""Low-precision parameters: the perturbed pass sees float32 ``w + e``, so ``e`` survives."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from tests import helpers

ALIASES = {
  name: lambda v=helpers.VARIANTS[name], **k: v.make(optax.sgd(0.1, momentum=0.9), **k)
  for name in (*helpers.CORE, *helpers.FAMILY, 'looksam')
}
ALIASES['sam every(2)'] = lambda **k: ALIASES['sam'](when=optax_sam.every(2), **k)
NARROW = (jnp.bfloat16, jnp.float16)


def _seen_by_grad_fn(tx, params, grad_fn, grads=None):
  """The weights a jitted one-call step hands to ``grad_fn`` (read back by a host callback,
  which works inside the branch of a ``when`` policy too), and the step's outputs."""
  seen = []

  def recording(p):
    jax.debug.callback(lambda q: seen.append(jax.tree.map(np.asarray, q)), p)
    return grad_fn(p)

  @jax.jit
  def step(params, grads):
    return tx.update(grads, tx.init(params), params, grad_fn=recording)

  updates, state = jax.block_until_ready(step(params, grad_fn(params) if grads is None else grads))
  (weights,) = seen
  return weights, updates, state


@pytest.mark.parametrize('dtype', NARROW, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize('name', sorted(ALIASES))
def test_grad_fn_receives_float32_w_plus_e(name, dtype):
  params, _, grad_fn = helpers.problem(dtype)
  grads = grad_fn(params)
  seen, updates, state = _seen_by_grad_fn(ALIASES[name](), params, grad_fn, grads)
  # The same step on float32 copies of the weights and gradients gives w.astype(f32) + e.
  wide = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  want, _, _ = _seen_by_grad_fn(ALIASES[name](), wide(params), grad_fn, wide(grads))
  for a, b in zip(jax.tree.leaves(seen), jax.tree.leaves(want), strict=True):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  assert jax.tree.map(jnp.result_type, updates) == jax.tree.map(jnp.result_type, params)


def test_sam_perturbation_by_hand_in_bfloat16():
  params, _, grad_fn = helpers.problem(jnp.bfloat16)
  grads = grad_fn(params)
  seen, _, _ = _seen_by_grad_fn(optax_sam.sam(optax.sgd(0.1), rho=0.05), params, grad_fn, grads)
  g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
  for k in params:
    want = np.asarray(params[k], np.float64) + 0.05 * g[k] / norm
    np.testing.assert_allclose(np.asarray(seen[k], np.float64), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('dtype', NARROW, ids=lambda d: jnp.dtype(d).name)
def test_states_keep_their_dtypes(dtype):
  params, _, grad_fn = helpers.problem(dtype)
  for name in sorted(ALIASES):
    tx = ALIASES[name](statistics=True)
    state = tx.init(params)
    step = jax.jit(lambda p, s, tx=tx: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
    for _ in range(2):
      updates, new_state = step(params, state)
      assert jax.tree.map(jnp.result_type, new_state) == jax.tree.map(jnp.result_type, state)
      assert jax.tree.map(jnp.result_type, updates) == jax.tree.map(jnp.result_type, params)
      params, state = optax.apply_updates(params, updates), new_state


def _mlp(width, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    'w1': jax.random.normal(k[0], (64, width)) / 8.0,
    'b1': jnp.zeros((width,)),
    'w2': jax.random.normal(k[1], (width, 10)) / np.sqrt(width),
  }
  x = jax.random.normal(k[2], (128, 64))
  y = jax.random.randint(k[3], (128,), 0, 10)

  def loss(p):
    dt = p['w1'].dtype  # computes in the dtype of the weights it is given
    h = jnp.tanh(x.astype(dt) @ p['w1'] + p['b1'])
    logits = (h @ p['w2']).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.tree.map(lambda v: v.astype(dtype), params), jax.jit(jax.grad(loss))


def _perturbed_gradient_error(perturb_in_param_dtype, width=256):
  """||g_adv - g_adv(float32 SAM)|| / ||g_adv(float32 SAM) - g(float32)||, bfloat16 weights."""
  params, grad_fn = _mlp(width, jnp.bfloat16)
  tx = optax_sam.sam(optax.sgd(0.1), rho=0.05, perturb_in_param_dtype=perturb_in_param_dtype)
  seen, _, _ = _seen_by_grad_fn(tx, params, grad_fn)
  g_adv = grad_fn(seen)
  w32 = jax.tree.map(lambda v: v.astype(jnp.float32), params)
  g32 = grad_fn(w32)
  norm = optax.tree.norm(g32)
  g_adv32 = grad_fn(jax.tree.map(lambda w, g: w + 0.05 * g / norm, w32, g32))
  error = optax.tree.norm(optax.tree.sub(optax.tree.cast(g_adv, jnp.float32), g_adv32))
  return float(error / optax.tree.norm(optax.tree.sub(g_adv32, g32)))


def test_bfloat16_perturbed_gradient_is_within_a_few_percent_of_float32_sam():
  after = _perturbed_gradient_error(perturb_in_param_dtype=False)
  before = _perturbed_gradient_error(perturb_in_param_dtype=True)
  assert after < 0.03, after
  assert before > 0.10, before  # what the rounding did before: the test can tell them apart


def test_statistics_report_the_rounding():
  params, grad_fn = _mlp(256, jnp.bfloat16)
  stats = {}
  for keep in (False, True):
    tx = optax_sam.sam(optax.sgd(0.1), rho=0.05, statistics=True, perturb_in_param_dtype=keep)
    _, _, state = _seen_by_grad_fn(tx, params, grad_fn)
    stats[keep] = optax_sam.step_statistics(state)
  assert float(stats[False].moved_fraction) > 0.99
  np.testing.assert_allclose(stats[False].effective_ratio, 1.0, atol=1e-4)
  np.testing.assert_allclose(stats[False].effective_cosine, 1.0, atol=1e-4)
  # In bfloat16 most coordinates do not move and those that do jump by a whole
  # spacing: the length survives about, the direction does not.
  assert float(stats[True].moved_fraction) < 0.6
  assert float(stats[True].effective_cosine) < 0.97


def test_memory_grows_by_at_most_one_float32_copy():
  params, grad_fn = _mlp(1024, jnp.bfloat16)
  size = sum(v.size for v in jax.tree.leaves(params))

  def temp(keep):
    tx = optax_sam.sam(optax.sgd(0.1), perturb_in_param_dtype=keep)
    step = lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return jax.jit(step).lower(params, tx.init(params)).compile().memory_analysis()

  after, before = temp(False), temp(True)
  assert after.temp_size_in_bytes - before.temp_size_in_bytes <= 4 * size * 1.05
  assert after.output_size_in_bytes == before.output_size_in_bytes
  assert after.argument_size_in_bytes == before.argument_size_in_bytes


def test_float32_params_are_unchanged_by_the_option():
  params, _, grad_fn = helpers.problem()
  a, ua, _ = _seen_by_grad_fn(optax_sam.sam(optax.sgd(0.1)), params, grad_fn)
  b, ub, _ = _seen_by_grad_fn(
    optax_sam.sam(optax.sgd(0.1), perturb_in_param_dtype=True), params, grad_fn
  )
  assert helpers.max_diff(a, b) == 0.0 and helpers.max_diff(ua, ub) == 0.0


def test_every_python_block_of_docs_mixed_precision_md_runs():
  text = (pathlib.Path(__file__).parent.parent / 'docs' / 'mixed_precision.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.DOTALL)
  assert len(blocks) == 2
  namespace = {'__name__': 'docs_mixed_precision_md'}
  for block in blocks:
    exec(compile(block, 'docs/mixed_precision.md', 'exec'), namespace)  # blocks assert results
  assert namespace['skipped_steps'] >= 1
