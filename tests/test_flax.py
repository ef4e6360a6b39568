"""Tests of optax_sam.flax: the NNX grad_fn helper and the Linen TrainState recipes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_sam
import optax_sam.flax

LR, RHO = 0.1, 0.05


class MLP(nnx.Module):
  """Linear -> BatchNorm -> relu -> Dropout -> Linear: every kind of state a step can touch."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(3, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jax.nn.relu(self.norm(self.hidden(x)))))


def loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def make_model(seed=0):
  return MLP(nnx.Rngs(params=seed, dropout=seed + 1))


@pytest.fixture
def batch():
  kx, ky = jax.random.split(jax.random.key(42))
  return jax.random.normal(kx, (32, 3)), jax.random.randint(ky, (32,), 0, 4)


def pure(tree):
  return nnx.as_pure(tree)


def sam_step(model, optimizer, x, y, **kwargs):
  """One SAM step with the helper; returns the clean loss."""
  (loss, _), grads, grad_fn = optax_sam.flax.nnx_value_and_grad(
    loss_fn, model, x, y, has_aux=True, **kwargs
  )
  optimizer.update(model, grads, grad_fn=grad_fn)
  return loss


def hand_written_sam_step(model, x, y):
  """SAM with SGD by split/merge: the perturbed pass starts from the pre-step state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = pure(params), pure(rest)

  def loss_at(p, state):
    m = nnx.merge(graphdef, p, state)
    loss, _ = loss_fn(m, x, y)
    return loss, pure(nnx.state(m, nnx.Not(nnx.Param)))

  g, clean_rest = jax.grad(loss_at, has_aux=True)(params, rest)
  norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, d: w + RHO * d / (norm + 1e-12), params, g)
  g_adv, _ = jax.grad(loss_at, has_aux=True)(perturbed, rest)
  new_params = jax.tree.map(lambda w, d: w - LR * d, params, g_adv)
  return new_params, clean_rest


def as_numpy(leaf):
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(as_numpy(u), as_numpy(v))


def assert_trees_close(a, b, **kwargs):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(as_numpy(u), as_numpy(v), **kwargs)


def test_nnx_step_equals_hand_written_split_merge_step(batch):
  x, y = batch
  model = make_model()
  expected_params, expected_rest = hand_written_sam_step(nnx.clone(model), x, y)
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(LR), rho=RHO), wrt=nnx.Param)
  sam_step(model, optimizer, x, y)
  assert_trees_close(pure(nnx.state(model, nnx.Param)), expected_params, rtol=1e-6, atol=1e-7)
  assert_trees_equal(pure(nnx.state(model, nnx.Not(nnx.Param))), expected_rest)


def test_batch_stats_equal_those_of_the_clean_pass_alone(batch):
  x, y = batch
  model = make_model()
  clean_only = nnx.clone(model)
  loss_fn(clean_only, x, y)  # the clean pass, nothing else
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(LR), rho=0.5), wrt=nnx.Param)
  sam_step(model, optimizer, x, y)
  assert_trees_equal(
    pure(nnx.state(model, nnx.BatchStat)), pure(nnx.state(clean_only, nnx.BatchStat))
  )
  # and the statistics did move: the clean pass updated them
  assert not np.allclose(model.norm.mean[...], 0.0)


@pytest.mark.parametrize('reuse_rngs', [True, False])
def test_rng_count_advances_once_per_step(batch, reuse_rngs):
  x, y = batch
  model = make_model()
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(LR)), wrt=nnx.Param)
  key_before = jax.random.key_data(model.dropout.rngs.key[...])
  for _ in range(3):
    sam_step(model, optimizer, x, y, reuse_rngs=reuse_rngs)
  assert int(model.dropout.rngs.count[...]) == 3
  np.testing.assert_array_equal(jax.random.key_data(model.dropout.rngs.key[...]), key_before)


def test_rho_zero_step_equals_sgd_because_the_dropout_masks_are_reused(batch):
  # With rho = 0 the perturbed pass runs at the clean weights; it returns the clean
  # gradient exactly only if it draws the clean pass's dropout mask.
  x, y = batch
  sgd_model, sam_model, fresh_model = make_model(), make_model(), make_model()
  sgd_opt = nnx.Optimizer(sgd_model, optax.sgd(LR), wrt=nnx.Param)
  grads = nnx.grad(lambda m: loss_fn(m, x, y)[0])(sgd_model)
  sgd_opt.update(sgd_model, grads)
  tx = optax_sam.sam(optax.sgd(LR), rho=0.0)
  sam_step(sam_model, nnx.Optimizer(sam_model, tx, wrt=nnx.Param), x, y)
  sam_step(fresh_model, nnx.Optimizer(fresh_model, tx, wrt=nnx.Param), x, y, reuse_rngs=False)
  sgd_params = pure(nnx.state(sgd_model, nnx.Param))
  assert_trees_equal(pure(nnx.state(sam_model, nnx.Param)), sgd_params)
  fresh_kernel = fresh_model.out.kernel[...]
  assert np.max(np.abs(fresh_kernel - sgd_params['out']['kernel'])) > 1e-4


def test_works_under_nnx_jit_and_matches_eager(batch):
  x, y = batch
  eager_model, jit_model = make_model(), make_model()
  tx = optax_sam.friendly_sam(optax.sgd(LR, momentum=0.9), rho=RHO)
  eager_opt = nnx.Optimizer(eager_model, tx, wrt=nnx.Param)
  jit_opt = nnx.Optimizer(jit_model, tx, wrt=nnx.Param)
  jit_step = nnx.jit(sam_step)
  eager_losses = [float(sam_step(eager_model, eager_opt, x, y)) for _ in range(3)]
  jit_losses = [float(jit_step(jit_model, jit_opt, x, y)) for _ in range(3)]
  np.testing.assert_allclose(jit_losses, eager_losses, rtol=1e-5)
  assert_trees_close(nnx.state(jit_model), nnx.state(eager_model), rtol=1e-5, atol=1e-6)
  assert int(jit_model.dropout.rngs.count[...]) == 3
  assert int(jit_opt.step[...]) == 3
  assert jit_losses[-1] < jit_losses[0]


def test_grad_fn_with_split_merge_under_jax_jit(batch):
  x, y = batch
  model = make_model()
  expected_params, _ = hand_written_sam_step(nnx.clone(model), x, y)
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(LR), rho=RHO), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    grad_fn = optax_sam.flax.nnx_grad_fn(loss_fn, model, x, y, has_aux=True)  # before
    grads = nnx.grad(lambda m: loss_fn(m, x, y)[0])(model)
    optimizer.update(model, grads, grad_fn=grad_fn)
    return nnx.state((model, optimizer))

  model, _ = nnx.merge(graphdef, step(state, x, y))
  assert_trees_close(pure(nnx.state(model, nnx.Param)), expected_params, rtol=1e-5, atol=1e-6)
  assert int(model.dropout.rngs.count[...]) == 1


def test_nnx_objects_in_the_arguments_are_not_advanced_by_the_perturbed_pass(batch):
  x, y = batch

  class NoRngModel(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.dropout = nnx.Dropout(0.5)

    def __call__(self, x, rngs):
      return self.dropout(self.linear(x), rngs=rngs)

  def loss_with_rngs(model, x, y, rngs):
    logits = model(x, rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  model, rngs = NoRngModel(nnx.Rngs(0)), nnx.Rngs(dropout=7)
  optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(LR), rho=0.0), wrt=nnx.Param)
  _, grads, grad_fn = optax_sam.flax.nnx_value_and_grad(loss_with_rngs, model, x, y, rngs)
  g_adv = grad_fn(pure(nnx.state(model, nnx.Param)))
  assert int(rngs.dropout.count[...]) == 1  # only the clean pass drew
  assert_trees_equal(g_adv, pure(grads))  # same mask, same weights: same gradient
  optimizer.update(model, grads, grad_fn=grad_fn)


def test_grad_fn_returns_the_structure_of_the_optimizer_params(batch):
  x, y = batch
  model = make_model()
  grad_fn = optax_sam.flax.nnx_grad_fn(loss_fn, model, x, y, has_aux=True)
  params = pure(nnx.state(model, nnx.Param))
  assert jax.tree.structure(grad_fn(params)) == jax.tree.structure(params)
  # a subset of the parameters (an optimizer with a narrower wrt) works too
  subset = pure(nnx.state(model.out, nnx.Param))
  grads = grad_fn(nnx.State({'out': subset}))
  assert set(grads.keys()) == {'out'}


def test_asam_default_mask_sees_nnx_bias_names(batch):
  x, y = batch
  model = make_model()
  mask = optax_sam.not_bias_mask(pure(nnx.state(model, nnx.Param)))
  assert mask['out']['kernel'] and mask['norm']['scale']
  assert not mask['out']['bias'] and not mask['hidden']['bias']
  optimizer = nnx.Optimizer(model, optax_sam.asam(optax.sgd(LR)), wrt=nnx.Param)
  losses = [float(sam_step(model, optimizer, x, y)) for _ in range(5)]
  assert losses[-1] < losses[0]


def test_nnx_two_phase_matches_one_call_and_clean_params(batch):
  x, y = batch
  one_model, two_model = make_model(), make_model()
  one_opt = nnx.Optimizer(one_model, optax_sam.sam(optax.sgd(LR), rho=RHO), wrt=nnx.Param)
  tx_two = optax_sam.sam(optax.sgd(LR), rho=RHO, two_phase=True)
  two_opt = nnx.Optimizer(two_model, tx_two, wrt=nnx.Param)
  sam_step(one_model, one_opt, x, y)

  before = pure(nnx.state(two_model, nnx.Param))
  snapshot = pure(nnx.state(two_model, nnx.Not(nnx.Param)))
  grads = nnx.grad(lambda m: loss_fn(m, x, y)[0])(two_model)  # clean pass
  clean_state = pure(nnx.state(two_model, nnx.Not(nnx.Param)))
  two_opt.update(two_model, grads)  # the model now holds w + e
  assert_trees_equal(optax_sam.flax.nnx_clean_params(two_model, two_opt), before)
  nnx.update(two_model, snapshot)  # the perturbed pass starts from the pre-step state
  g_adv = nnx.grad(lambda m: loss_fn(m, x, y)[0])(two_model)
  two_opt.update(two_model, g_adv)
  nnx.update(two_model, clean_state)  # keep the clean pass's statistics and RNG count
  assert_trees_close(nnx.state(two_model), nnx.state(one_model), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Linen


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.5, deterministic=not train)(jax.nn.relu(x))
    return nn.Dense(4)(x)


class TrainState(train_state.TrainState):
  batch_stats: dict


def linen_setup(tx):
  model = LinenMLP()
  variables = model.init(jax.random.key(0), jnp.ones((1, 3)), train=False)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=tx,
  )


def linen_loss(params, batch_stats, x, y, dropout_key):
  logits, updates = LinenMLP().apply(
    {'params': params, 'batch_stats': batch_stats},
    x,
    train=True,
    rngs={'dropout': dropout_key},
    mutable=['batch_stats'],
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, updates['batch_stats']


@jax.jit
def linen_one_call_step(state, x, y, dropout_key):
  """The recipe of docs/flax.md: tx.update by hand with grad_fn, then state.replace."""
  (loss, batch_stats), grads = jax.value_and_grad(linen_loss, has_aux=True)(
    state.params, state.batch_stats, x, y, dropout_key
  )

  def grad_fn(params):  # pre-step statistics, same dropout key; its statistics are dropped
    return jax.grad(linen_loss, has_aux=True)(params, state.batch_stats, x, y, dropout_key)[0]

  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
  )
  return new_state, loss


@jax.jit
def linen_helper_step(state, x, y, dropout_key):
  (loss, batch_stats), grads = jax.value_and_grad(linen_loss, has_aux=True)(
    state.params, state.batch_stats, x, y, dropout_key
  )

  def grad_fn(params):
    return jax.grad(linen_loss, has_aux=True)(params, state.batch_stats, x, y, dropout_key)[0]

  state = optax_sam.flax.apply_gradients(
    state, grads=grads, grad_fn=grad_fn, batch_stats=batch_stats
  )
  return state, loss


@jax.jit
def linen_two_phase_step(state, x, y, dropout_key):
  """Two-phase recipe: plain apply_gradients twice, batch statistics from the clean pass."""
  (loss, batch_stats), grads = jax.value_and_grad(linen_loss, has_aux=True)(
    state.params, state.batch_stats, x, y, dropout_key
  )
  perturbed = state.apply_gradients(grads=grads)  # params -> w + e
  g_adv, _ = jax.grad(linen_loss, has_aux=True)(
    perturbed.params, state.batch_stats, x, y, dropout_key
  )
  return perturbed.apply_gradients(grads=g_adv, batch_stats=batch_stats), loss


def linen_hand_written(state, x, y, dropout_key):
  (_, batch_stats), g = jax.value_and_grad(linen_loss, has_aux=True)(
    state.params, state.batch_stats, x, y, dropout_key
  )
  norm = optax.tree.norm(g)
  perturbed = jax.tree.map(lambda w, d: w + RHO * d / (norm + 1e-12), state.params, g)
  g_adv, _ = jax.grad(linen_loss, has_aux=True)(perturbed, state.batch_stats, x, y, dropout_key)
  return jax.tree.map(lambda w, d: w - LR * d, state.params, g_adv), batch_stats


def test_linen_one_call_recipe_equals_hand_written_sam(batch):
  x, y = batch
  state = linen_setup(optax_sam.sam(optax.sgd(LR), rho=RHO))
  key = jax.random.key(3)
  expected_params, expected_stats = linen_hand_written(state, x, y, key)
  by_hand, _ = linen_one_call_step(state, x, y, key)
  with_helper, _ = linen_helper_step(state, x, y, key)
  assert_trees_close(by_hand.params, expected_params, rtol=1e-5, atol=1e-6)
  assert_trees_equal(with_helper.params, by_hand.params)
  assert_trees_equal(with_helper.opt_state, by_hand.opt_state)
  # batch statistics: those of the clean pass alone
  assert_trees_equal(by_hand.batch_stats, expected_stats)
  assert_trees_equal(with_helper.batch_stats, expected_stats)
  assert int(by_hand.step) == int(with_helper.step) == 1


def test_linen_two_phase_recipe_matches_one_call(batch):
  x, y = batch
  one = linen_setup(optax_sam.gsam(optax.sgd(LR, momentum=0.9), rho=RHO))
  two = linen_setup(optax_sam.gsam(optax.sgd(LR, momentum=0.9), rho=RHO, two_phase=True))
  for i in range(3):
    key = jax.random.key(i)
    one, loss_one = linen_helper_step(one, x, y, key)
    two, loss_two = linen_two_phase_step(two, x, y, key)
    np.testing.assert_allclose(float(loss_two), float(loss_one), rtol=1e-5)
  assert_trees_close(two.params, one.params, rtol=1e-5, atol=1e-6)
  # The clean pass's statistics in both (the perturbed pass's differ by far more): two compiled
  # programs may round the batch mean differently (1 ulp on jax 0.10.0, equal on 0.10.2).
  assert_trees_close(two.batch_stats, one.batch_stats, rtol=1e-6, atol=1e-8)
  assert int(two.step) == 6 and int(one.step) == 3  # apply_gradients counts both calls
  assert not bool(optax_sam.is_perturbed(two.opt_state))


def test_linen_two_phase_clean_params_between_the_calls(batch):
  x, y = batch
  state = linen_setup(optax_sam.sam(optax.sgd(LR), rho=0.5, two_phase=True))
  grads, _ = jax.grad(linen_loss, has_aux=True)(
    state.params, state.batch_stats, x, y, jax.random.key(0)
  )
  perturbed = state.apply_gradients(grads=grads)
  assert bool(optax_sam.is_perturbed(perturbed.opt_state))
  moved = optax.tree.norm(optax.tree.sub(perturbed.params, state.params))
  np.testing.assert_allclose(float(moved), 0.5, rtol=1e-5)  # ||e|| = rho
  assert_trees_equal(optax_sam.clean_params(perturbed.params, perturbed.opt_state), state.params)


def test_apply_gradients_without_grad_fn_is_flax_apply_gradients(batch):
  x, y = batch
  state = linen_setup(optax.sgd(LR, momentum=0.9))
  grads, stats = jax.grad(linen_loss, has_aux=True)(
    state.params, state.batch_stats, x, y, jax.random.key(0)
  )
  ours = optax_sam.flax.apply_gradients(state, grads=grads, batch_stats=stats)
  theirs = state.apply_gradients(grads=grads, batch_stats=stats)
  assert_trees_equal(ours.params, theirs.params)
  assert_trees_equal(ours.batch_stats, theirs.batch_stats)
  assert int(ours.step) == int(theirs.step) == 1


def test_importing_optax_sam_does_not_import_flax():
  import subprocess
  import sys

  code = 'import sys, optax_sam; print("flax" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False'


def test_every_python_block_of_docs_flax_md_runs():
  import pathlib
  import re

  text = (pathlib.Path(__file__).parent.parent / 'docs' / 'flax.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.DOTALL)
  assert len(blocks) >= 6
  namespace = {'__name__': 'docs_flax_md'}
  for block in blocks:
    exec(compile(block, 'docs/flax.md', 'exec'), namespace)  # the blocks assert their results
  assert int(namespace['state'].step) == 2


def test_the_complete_nnx_program_of_docs_runs():
  """docs/nnx_program.md: its blocks, in order, are one program that asserts its own results."""
  import pathlib
  import re

  pytest.importorskip('sklearn')  # the floors' environment has Flax but not the examples' extras
  text = (pathlib.Path(__file__).parent.parent / 'docs' / 'nnx_program.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.DOTALL)
  assert len(blocks) == 5
  namespace = {'__name__': 'docs_nnx_program_md'}
  for block in blocks:
    exec(compile(block, 'docs/nnx_program.md', 'exec'), namespace)
  assert int(optax_sam.skipped_steps(nnx.as_pure(namespace['optimizer'].opt_state))) == 0
  assert float(namespace['sam'].sharpness) > 0


def test_nnx_normalization_mask_selects_the_norm_layers_by_type():
  """SAM-ON's mask: True exactly on the normalization layers' parameters, whatever their names;
  a SAM-ON step through nnx.Optimizer perturbs only them."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.anything = nnx.BatchNorm(4, rngs=rngs)
      self.blocks = nnx.List([nnx.LayerNorm(4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

    def __call__(self, x):
      return self.blocks[1](self.blocks[0](self.anything(self.dense(x))))

  model = Net(nnx.Rngs(0))
  mask = optax_sam.flax.nnx_normalization_mask(model)
  selected = {
    jax.tree_util.keystr(path)
    for path, chosen in jax.tree_util.tree_flatten_with_path(mask)[0]
    if chosen
  }
  assert selected == {
    "['anything']['bias']",
    "['anything']['scale']",
    "['blocks'][0]['bias']",
    "['blocks'][0]['scale']",
  }
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  ascent = optax_sam.ascent(0.5, perturb_mask=mask)
  e, _ = ascent.update(jax.tree.map(jnp.ones_like, params), ascent.init(params), params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(e)[0]:
    assert bool(jnp.any(leaf != 0)) == (jax.tree_util.keystr(path) in selected)
  x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
  optimizer = nnx.Optimizer(
    model, optax_sam.sam(optax.sgd(0.1), rho=0.5, perturb_mask=mask), wrt=nnx.Param
  )
  loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
  loss, grads, grad_fn = optax_sam.flax.nnx_value_and_grad(loss_fn, model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn)
