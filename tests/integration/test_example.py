"""Tests of the training example (optax_sam.examples): data, optimizers, loop, resume, command line.

Everything runs offline on tiny settings: scikit-learn's digits (bundled), a
200-example MNIST-1D generated into a temporary cache, and fake
tensorflow-datasets modules for CIFAR-10. One tiny configuration is shared by
the training tests, so that ``train_step`` compiles once for all of them.
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_sam
from optax_sam.examples import checkpoints as checkpoints_lib
from optax_sam.examples import config as config_lib
from optax_sam.examples import data as data_lib
from optax_sam.examples import main as main_lib
from optax_sam.examples import models, reporting, train

# One tiny run: 4 channels, 64 examples a step, constant learning rate (the same compiled step
# serves runs of any length, so resume tests reuse it).
TINY = config_lib.Config(
  dataset='digits', width=4, batch_size=64, lr_schedule='constant', epochs=1, lr=0.1
)
TINY_FLAGS = [
  '--dataset=digits',
  '--width=4',
  '--batch-size=64',
  '--lr-schedule=constant',
  '--lr=0.1',
  '--no-progress',
]


@pytest.fixture(scope='module')
def digits():
  """Digits, cut to 256 training and 100 test examples (4 steps an epoch)."""
  full = data_lib.load('digits')
  return dataclasses.replace(
    full,
    x_train=full.x_train[:256],
    y_train=full.y_train[:256],
    x_test=full.x_test[:100],
    y_test=full.y_test[:100],
  )


def restored_state(workdir, config, dataset):
  """The last checkpoint in ``workdir``: (model, optimizer) updated to it, its state, its meta."""
  model = train.create_model(config, dataset)
  optimizer = nnx.Optimizer(model, train.create_optimizer(config, 4), wrt=nnx.Param)
  checkpoints = checkpoints_lib.Checkpoints(workdir / checkpoints_lib.CHECKPOINT_DIR, create=False)
  state, meta = checkpoints.restore(
    checkpoints.latest_epoch(), train._checkpointed(model, optimizer)
  )
  checkpoints.close()
  nnx.update(optimizer, state['optimizer'])
  nnx.update(model, state['model'])
  return model, optimizer, state, meta


def key_data_leaves(tree):
  leaves = []
  for leaf in jax.tree.leaves(nnx.as_pure(tree)):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    leaves.append(np.asarray(leaf))
  return leaves


# ----------------------------------------------------------------------------- data


def test_digits_are_split_80_20_and_scaled(digits):
  full = data_lib.load('digits')
  assert full.x_train.shape == (1437, 8, 8, 1) and full.x_test.shape == (360, 8, 8, 1)
  assert full.x_train.dtype == np.float32 and full.y_train.dtype == np.int32
  assert float(full.x_train.min()) == 0.0 and float(full.x_train.max()) == 1.0
  assert (full.spatial_ndim, full.channels, full.num_classes) == (2, 1, 10)


def test_mnist1d_is_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  first = data_lib.load('mnist1d', num_samples=200)
  assert first.x_train.shape == (160, 40, 1) and first.x_test.shape == (40, 40, 1)
  assert sorted(set(first.y_train.tolist())) == list(range(10))
  assert (tmp_path / 'optax_sam' / 'mnist1d-200.npz').exists()
  # the package standardizes the whole set to mean 0, std 1
  everything = np.concatenate([first.x_train, first.x_test])
  np.testing.assert_allclose([everything.mean(), everything.std()], [0.0, 1.0], atol=1e-5)

  def no_generation(num_samples):
    raise AssertionError('the cache should have been used')

  monkeypatch.setattr(data_lib, '_generate_mnist1d', no_generation)
  second = data_lib.load('mnist1d', num_samples=200)
  np.testing.assert_array_equal(second.x_train, first.x_train)
  np.testing.assert_array_equal(second.y_test, first.y_test)


def test_label_noise_changes_exactly_the_fraction_asked_and_never_the_test_set():
  clean = data_lib.load('digits')
  noisy = data_lib.load('digits', label_noise=0.2, seed=3)
  changed = noisy.y_train != clean.y_train
  assert int(changed.sum()) == round(0.2 * len(clean.y_train)) == 287
  np.testing.assert_array_equal(noisy.y_test, clean.y_test)
  assert noisy.y_train.min() >= 0 and noisy.y_train.max() <= 9
  again = data_lib.load('digits', label_noise=0.2, seed=3)
  np.testing.assert_array_equal(again.y_train, noisy.y_train)


def test_train_batches_depend_only_on_seed_and_epoch():
  x, y = np.arange(10)[:, None], np.arange(10)
  epoch0 = [b[1].tolist() for b in data_lib.train_batches(x, y, 4, seed=0, epoch=0)]
  assert len(epoch0) == 2 and all(len(b) == 4 for b in epoch0)  # the partial batch is dropped
  assert epoch0 == [b[1].tolist() for b in data_lib.train_batches(x, y, 4, seed=0, epoch=0)]
  assert epoch0 != [b[1].tolist() for b in data_lib.train_batches(x, y, 4, seed=0, epoch=1)]
  padded = list(data_lib.eval_batches(x, y, 4))
  assert [m.tolist() for _, _, m in padded][-1] == [1, 1, 0, 0]
  assert sum(int(m.sum()) for _, _, m in padded) == 10


class FakeTfds(types.ModuleType):
  """A stand-in for tensorflow_datasets: ``load`` returns small arrays, or fails."""

  def __init__(self, fail=False):
    super().__init__('tensorflow_datasets')
    self.fail, self.calls = fail, []
    rng = np.random.default_rng(0)
    self.images = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (12, 6)]
    self.labels = [rng.integers(0, 10, n, dtype=np.int64) for n in (12, 6)]

  def load(self, name, **kwargs):
    self.calls.append((name, kwargs))
    if self.fail:
      raise AssertionError('Dataset cifar10: could not find data in /nowhere.')
    return [(self.images[0], self.labels[0]), (self.images[1], self.labels[1])]

  def as_numpy(self, tree):
    return tree


def test_cifar10_loads_through_tfds_without_downloading(monkeypatch):
  fake = FakeTfds()
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake)
  ds = data_lib.load('cifar10', data_dir='/data/tfds')
  ((name, kwargs),) = fake.calls
  assert name == 'cifar10' and kwargs['download'] is False and kwargs['data_dir'] == '/data/tfds'
  assert kwargs['split'] == ['train', 'test'] and kwargs['batch_size'] == -1
  assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  expected = (fake.images[0][3, 4, 5] / 255.0 - data_lib.CIFAR10_MEAN) / data_lib.CIFAR10_STD
  np.testing.assert_allclose(ds.x_train[3, 4, 5], expected, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_test, fake.labels[1])
  assert (ds.spatial_ndim, ds.channels) == (2, 3)
  abstract = nnx.eval_shape(lambda: models.ResNet(10, in_channels=3, ndim=2, rngs=nnx.Rngs(0)))
  assert abstract.stem.kernel.shape == (3, 3, 3, 32)


def test_cifar10_missing_package_or_data_is_a_data_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # import fails
  with pytest.raises(data_lib.DataError, match='pip install tensorflow-datasets'):
    data_lib.load('cifar10')
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', FakeTfds(fail=True))
  with pytest.raises(data_lib.DataError, match='not prepared in /x; prepare it once with'):
    data_lib.load('cifar10', data_dir='/x')


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
  ('name', 'canonical', 'flags'),
  [
    ('sgd', 'sgd', dict(sam=False)),
    ('SAM', 'sam', {}),
    ('usam', 'usam', dict(normalize=False)),
    ('asam', 'asam', dict(adaptive=True)),
    ('fsam', 'fsam', dict(friendly=True)),
    ('stablesam', 'stablesam', dict(normalize=False, stable=True)),
    ('stable+usam', 'stablesam', dict(normalize=False, stable=True)),
    ('gsam', 'gsam', dict(gsam=True)),
    ('stable+fsam', 'fsam+stable', dict(friendly=True, stable=True)),
    ('asam+stable', 'asam+stable', dict(adaptive=True, stable=True)),
    ('asam+fsam', 'fsam+asam', dict(friendly=True, adaptive=True)),
    ('sam+stable', 'sam+stable', dict(stable=True)),
  ],
)
def test_optimizer_names(name, canonical, flags):
  spec = config_lib.parse_optimizer(name)
  expected = config_lib.OptimizerSpec(canonical, **flags)
  assert spec == expected


@pytest.mark.parametrize('name', ['adam', 'sam+sam', 'sam+usam', 'gsam+stable', '', 'sgd+sam'])
def test_unknown_optimizer_names_list_the_choices(name):
  with pytest.raises(config_lib.ConfigError, match='choose from sgd, sam, usam, asam'):
    config_lib.parse_optimizer(name)


BASE = dict(lr=0.1, momentum=0.9, weight_decay=0.01)


def expected_optimizer(name):
  kernels = lambda p: jax.tree.map(lambda w: w.ndim > 1, p)
  base = optax.chain(
    optax.add_decayed_weights(BASE['weight_decay'], mask=kernels),
    optax.sgd(BASE['lr'], momentum=BASE['momentum']),
  )
  return {
    'sgd': base,
    'sam': optax_sam.sam(base, 0.05),
    'usam': optax_sam.sam(base, 0.05, normalize=False),
    'asam': optax_sam.asam(base, 0.5, eta=0.01),
    'fsam': optax_sam.friendly_sam(base, 0.05, sigma=1.0, lmbda=0.9),
    'stablesam': optax_sam.stable_sam(base, 0.05),
    'gsam': optax_sam.gsam(base, 0.05, alpha=0.4),
    'fsam+stable': optax_sam.friendly_sam(base, 0.05, stable=True),
    'asam+stable': optax_sam.asam(base, 0.5, stable=True),
    'fsam+asam': optax_sam.friendly_sam(
      base, 0.5, adaptive=True, eta=0.01, adaptive_mask=optax_sam.not_bias_mask
    ),
    'wsam': optax_sam.wsam(base, 0.05, learning_rate=BASE['lr']),
    'vasso': optax_sam.vasso(base, 0.05),
    'gcsam': optax_sam.gcsam(base, 0.05),
    'unifiedsam': optax_sam.unified_sam(base, 0.1),
    'lookbehind': optax_sam.lookbehind_sam(base, 0.05),
    'sampa': optax_sam.sampa(base, 0.1),
    'mrwp': optax_sam.mrwp(base, sigma=0.01),  # --rho is its sigma
    'marwp': optax_sam.marwp(base, sigma=0.01),
  }[name]


def assert_same_steps(ours, theirs, steps, grad_fn_too=True):
  """``steps`` updates of both optimizers on a small problem give the same weights; returns them."""
  params = {'kernel': jnp.array([[1.0, -2.0], [0.5, 3.0]]), 'bias': jnp.array([0.3, -0.1])}
  loss = lambda p: jnp.sum(jnp.tanh(p['kernel'] @ jnp.array([1.0, 2.0]) + p['bias'].sum()) ** 2)
  grad_fn = jax.grad(loss)
  extra = {'grad_fn': grad_fn} if grad_fn_too else {}
  results = []
  for tx in (ours, theirs):
    p, state = params, tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(grad_fn(p), state, p, **extra)
      p = optax.apply_updates(p, updates)
    results.append(p)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_array_equal(a, b)
  return params, results[0]


@pytest.mark.parametrize(
  'name',
  ['sgd', 'sam', 'usam', 'asam', 'fsam', 'stablesam', 'gsam', 'fsam+stable', 'asam+stable',
   'fsam+asam', 'wsam', 'vasso', 'gcsam', 'unifiedsam', 'lookbehind', 'sampa', 'mrwp', 'marwp'],
)  # fmt: skip
def test_create_optimizer_builds_the_named_alias(name):
  config = config_lib.Config(optimizer=name, lr_schedule='constant', **BASE)
  ours, theirs = train.create_optimizer(config, steps_per_epoch=10), expected_optimizer(name)
  params, trained = assert_same_steps(ours, theirs, 3, grad_fn_too=name != 'sgd')
  assert not np.allclose(trained['kernel'], params['kernel'])


def test_mrwp_trains_with_its_sigma_as_the_radius(tmp_path, digits):
  """``--optimizer mrwp``: the default radius is m-RWP's sigma, and a short run trains."""
  config = dataclasses.replace(TINY, optimizer='mrwp')
  assert config_lib.default_rho(config_lib.parse_optimizer('mrwp')) == 0.01
  metrics = train.train_and_evaluate(
    config, tmp_path, dataset=digits, progress=False, log=lambda _: None
  )
  assert np.isfinite(metrics['final']['train_loss']) and 0 <= metrics['final']['test_accuracy'] <= 1


def test_bsam_trains_and_reports_its_model_average(tmp_path, digits):
  """``--optimizer bsam``: its own optimizer (no SGD base) on the epoch's examples, and the
  calibration of its posterior's model average beside the trained weights'."""
  config = dataclasses.replace(TINY, optimizer='bsam', predictive_samples=3)
  tx = train.create_optimizer(config.validate(), steps_per_epoch=10)
  state = tx.init({'w': jnp.zeros(2)})
  n = 10 * config.batch_size
  assert float(state.data_size) == n
  assert np.allclose(optax_sam.posterior_stddev(state)['w'], 1 / np.sqrt(n))
  lines = []
  metrics = train.train_and_evaluate(
    config, tmp_path, dataset=digits, progress=False, log=lines.append
  )
  scores = metrics['calibration']
  assert scores['model_average']['samples'] == 3
  for part in (scores['mean'], scores['model_average']):
    assert 0 <= part['test_ece'] <= 1 and 0 <= part['test_accuracy'] <= 1 and part['test_nll'] > 0
  assert scores['mean']['test_accuracy'] == metrics['final']['test_accuracy']
  assert any('model average of 3 posterior samples' in line for line in lines)
  for bad, match in (
    (dict(optimizer='sam', predictive_samples=2), 'samples bsam'),
    (dict(optimizer='bsam', sam_every=2), 'do not apply to bsam'),
    (dict(optimizer='bsam', predictive_samples=-1), 'predictive-samples'),
  ):
    with pytest.raises(config_lib.ConfigError, match=match):
      dataclasses.replace(TINY, **bad).validate()


def test_sampa_pairs_each_batch_with_the_one_before(tmp_path, digits, monkeypatch):
  """The perturbed point's batch is the previous step's (the first step: its own), and it trains."""
  seen = []
  real = train.sampa_train_step
  key = lambda a: hash(np.asarray(a).tobytes())
  record = lambda m, o, x, y, px, py: seen.append((key(x), key(px))) or real(m, o, x, y, px, py)
  monkeypatch.setattr(train, 'sampa_train_step', record)
  config = dataclasses.replace(TINY, optimizer='sampa')
  metrics = train.train_and_evaluate(
    config, tmp_path, dataset=digits, progress=False, log=lambda _: None
  )
  assert len(seen) == 4 and seen[0][0] == seen[0][1]
  assert [previous for _, previous in seen[1:]] == [current for current, _ in seen[:-1]]
  assert np.isfinite(metrics['final']['train_loss']) and 0 <= metrics['final']['test_accuracy'] <= 1
  with pytest.raises(config_lib.ConfigError, match='do not apply to sampa'):
    dataclasses.replace(config, sam_every=2).validate()
  with pytest.raises(config_lib.ConfigError, match='do not apply to sampa'):
    dataclasses.replace(config, accumulate=2).validate()


# ----------------------------------------------------------------------------- training loop


EXPECTED_METRIC_KEYS = {'config', 'dataset', 'history', 'final', 'calibration'}
EXPECTED_FINAL_KEYS = set(reporting.EPOCH_KEYS) | {'best_test_accuracy'}


def test_one_epoch_writes_metrics_plot_and_checkpoint(tmp_path, digits):
  lines = []
  metrics = train.train_and_evaluate(
    TINY, tmp_path, dataset=digits, progress=False, log=lines.append
  )
  on_disk = json.loads((tmp_path / reporting.METRICS_FILE).read_text())
  assert on_disk == json.loads(json.dumps(metrics))
  assert set(on_disk) == EXPECTED_METRIC_KEYS
  assert set(on_disk['final']) == EXPECTED_FINAL_KEYS | {'step_statistics'}
  (epoch,) = on_disk['history']
  assert set(epoch) == set(reporting.EPOCH_KEYS) | {'step_statistics'} and epoch['epoch'] == 1
  assert set(epoch['step_statistics']) == set(optax_sam.SAMStatistics._fields) | {'norm_ratio'}
  assert epoch['step_statistics']['perturbation_norm'] == pytest.approx(0.05, rel=1e-5)
  assert on_disk['dataset'] == {'name': 'digits', 'train_examples': 256, 'test_examples': 100}
  assert on_disk['config']['optimizer'] == 'sam' and on_disk['config']['rho'] == 0.05
  assert np.isfinite(epoch['train_loss']) and 0.0 <= epoch['test_accuracy'] <= 1.0
  assert (tmp_path / reporting.CURVES_FILE).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert lines[0].startswith('epoch   1/1  train loss ')
  # the reported test metrics are those of the checkpointed model
  model, _, _, meta = restored_state(tmp_path, TINY, digits)
  loss, accuracy = train.evaluate(model, digits.x_test, digits.y_test)
  assert accuracy == epoch['test_accuracy'] and loss == pytest.approx(epoch['test_loss'], rel=1e-6)
  assert meta['epoch'] == 1 and meta['history'] == on_disk['history']


def test_resume_reaches_the_same_parameters_as_a_straight_run(tmp_path, digits):
  two = dataclasses.replace(TINY, epochs=2)
  straight = train.train_and_evaluate(
    two, tmp_path / 'a', dataset=digits, progress=False, log=lambda _: None
  )
  train.train_and_evaluate(TINY, tmp_path / 'b', dataset=digits, progress=False, log=lambda _: None)
  resumed = train.train_and_evaluate(
    two, tmp_path / 'b', dataset=digits, resume=True, progress=False, log=lambda _: None
  )
  _, _, state_a, _ = restored_state(tmp_path / 'a', two, digits)
  _, _, state_b, _ = restored_state(tmp_path / 'b', two, digits)
  for a, b in zip(key_data_leaves(state_a), key_data_leaves(state_b), strict=True):
    np.testing.assert_array_equal(a, b)  # parameters, BatchNorm, RNG counts, SAM and SGD state
  strip = lambda history: [{k: v for k, v in h.items() if k != 'seconds'} for h in history]
  assert strip(resumed['history']) == strip(straight['history'])
  assert straight['history'][1]['train_loss'] < straight['history'][0]['train_loss']


def test_sharpness_every_records_the_measures_without_changing_training(
  tmp_path, digits, monkeypatch
):
  # 3 Lanczos steps instead of 10: the same program, a third of the (unrolled) compile.
  monkeypatch.setattr(train, 'SHARPNESS_LANCZOS_STEPS', 3)
  two = dataclasses.replace(TINY, epochs=2, optimizer='fsam')
  quiet = dict(dataset=digits, progress=False, log=lambda _: None)
  plain = train.train_and_evaluate(two, tmp_path / 'a', **quiet)
  measured = train.train_and_evaluate(
    dataclasses.replace(two, sharpness_every=1), tmp_path / 'b', **quiet
  )
  strip = lambda history: [
    {k: v for k, v in h.items() if k not in ('seconds', 'sharpness')} for h in history
  ]
  assert strip(measured['history']) == strip(plain['history'])  # measuring changes nothing
  assert all('sharpness' not in h for h in plain['history'])
  for h in measured['history']:
    assert set(h['sharpness']) == {'hessian_top_eigenvalue', 'hessian_residual', 'sam_sharpness'}
    assert h['sharpness']['hessian_top_eigenvalue'] > 0
    assert h['step_statistics']['ema_cosine'] != 0 or h['epoch'] == 1
  assert (tmp_path / 'b' / reporting.SHARPNESS_PLOT).read_bytes()[:4] == b'\x89PNG'
  # The recorded SAM sharpness is L(w + e) - L(w) of the final model, by hand, in eval mode.
  model, _, _, _ = restored_state(tmp_path / 'b', two, digits)
  x = jnp.asarray(digits.x_train[: train.SHARPNESS_EXAMPLES])
  y = jnp.asarray(digits.y_train[: train.SHARPNESS_EXAMPLES])
  view = nnx.view(model, deterministic=True, use_running_average=True)
  graphdef, params, rest = nnx.split(view, nnx.Param, ...)
  loss = lambda p: train.loss_fn(nnx.merge(graphdef, p, rest), x, y)[0]
  g = jax.grad(loss)(params)
  e = jax.tree.map(lambda v: train.SHARPNESS_RHO * v / optax.tree.norm(g), g)
  by_hand = float(loss(jax.tree.map(lambda w, d: w + d, params, e)) - loss(params))
  final = measured['history'][-1]['sharpness']['sam_sharpness']
  assert final == pytest.approx(by_hand, rel=1e-3, abs=1e-6)


def test_resume_refuses_changed_options_and_leaves_the_run_alone(tmp_path, digits, capsys):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(
    TINY, workdir, dataset=dataset_full_digits(), progress=False, log=lambda _: None
  )
  before = (workdir / reporting.METRICS_FILE).read_text()
  code = main_lib.main([*TINY_FLAGS, '--epochs=2', '--lr=0.5', '--resume', f'--workdir={workdir}'])
  err = capsys.readouterr().err
  assert code == 2 and err.count('\n') == 1
  assert 'only --epochs may change when resuming' in err and '--lr 0.1 -> 0.5' in err
  assert (workdir / reporting.METRICS_FILE).read_text() == before


def dataset_full_digits():
  return data_lib.load('digits')


def test_main_prints_the_final_test_accuracy_last(tmp_path, capsys):
  workdir = tmp_path / 'out'
  assert main_lib.main([*TINY_FLAGS, '--epochs=1', f'--workdir={workdir}']) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  metrics = json.loads((workdir / reporting.METRICS_FILE).read_text())
  accuracy = metrics['final']['test_accuracy']
  assert lines[-1] == f'final test accuracy: {accuracy:.4f}'
  assert metrics['dataset']['train_examples'] == 1437


def test_main_prints_a_header_naming_what_it_runs(tmp_path, capsys):
  flags = [*TINY_FLAGS, '--epochs=1', '--optimizer=fsam', '--label-noise=0.2']
  assert main_lib.main([*flags, f'--workdir={tmp_path / "out"}']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (
    'optimizer: fsam (rho 0.05, sigma 1, lmbda 0.9) around SGD (lr 0.1 constant, momentum 0.9, '
    'weight decay 0.0005)'
  )
  assert lines[1] == (
    'data: digits, 1437 train / 360 test examples, label noise 0.2; 1 epoch of batch 64, seed 0'
  )
  assert lines[2] == f'devices: {jax.device_count()} (cpu); output: {tmp_path / "out"}'


@pytest.mark.parametrize('compare', [False, True], ids=['single', 'compare'])
def test_an_earlier_run_is_kept_unless_resume_or_overwrite(tmp_path, capsys, compare):
  flags = [*TINY_FLAGS, '--epochs=1', f'--workdir={tmp_path}']
  flags += ['--compare=sgd,sam'] if compare else []
  assert main_lib.main(flags) == 0
  metrics = tmp_path / ('sam' if compare else '') / reporting.METRICS_FILE
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
  capsys.readouterr()
  assert main_lib.main(flags) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --workdir {tmp_path} holds an earlier run (')
  assert err.endswith(
    ': add --resume to continue it, --overwrite to replace it, or give another --workdir\n'
  )
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()} == before
  assert main_lib.main([*flags, '--resume', '--overwrite']) == 2
  assert 'exclusive' in capsys.readouterr().err
  assert main_lib.main([*flags, '--overwrite']) == 0
  assert metrics.stat().st_mtime_ns > before[metrics]


def test_sharpness_plot_draws_only_the_measured_panels(tmp_path):
  from PIL import Image

  record = dict(epoch=1, step_statistics=dict(norm_ratio=1.1, cosine=0.9, ema_cosine=0.0))
  measured = dict(epoch=1, sharpness=dict(hessian_top_eigenvalue=3.0, sam_sharpness=0.01))
  path = tmp_path / 'p.png'
  assert not reporting.plot_sharpness(path, [dict(epoch=1)], 't') and not path.exists()
  widths = {}
  for name, history in dict(steps=[record], sharpness=[measured], both=[record | measured]).items():
    assert reporting.plot_sharpness(path, history, 't')
    widths[name] = Image.open(path).size[0]
  assert widths == dict(steps=500, sharpness=1000, both=1500)


def test_compare_trains_each_optimizer_and_tabulates_their_metrics(tmp_path, capsys):
  assert (
    main_lib.main([*TINY_FLAGS, '--epochs=1', f'--workdir={tmp_path}', '--compare=sgd,sam']) == 0
  )
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-3].startswith('optimizer  train loss  train acc  test acc  best test acc  time (s)')
  table = json.loads((tmp_path / reporting.COMPARISON_FILE).read_text())
  assert list(table) == ['sgd', 'sam']
  for row, name in zip(out[-2:], table, strict=True):
    run = json.loads((tmp_path / name / reporting.METRICS_FILE).read_text())
    assert run['final'] == table[name] and run['config']['seed'] == 0
    assert row.split()[:5] == [
      name,
      f'{run["final"]["train_loss"]:.4f}',
      f'{run["final"]["train_accuracy"]:.4f}',
      f'{run["final"]["test_accuracy"]:.4f}',
      f'{run["final"]["best_test_accuracy"]:.4f}',
    ]
  assert table['sgd']['train_loss'] != table['sam']['train_loss']
  assert (tmp_path / reporting.COMPARISON_PLOT).read_bytes()[:4] == b'\x89PNG'


# ----------------------------------------------------------------------------- bad input


def _file(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('not a folder')
  return path


BAD_INPUT = [
  (['--optimizer=adamw'], "unknown optimizer 'adamw'; choose from sgd, sam, usam, asam, fsam"),
  (['--compare=sam,nope'], "unknown optimizer 'nope'; choose from sgd"),
  (['--compare=sam,stablesam,usam+stable'], 'the same optimizer twice (stablesam)'),
  (['--dataset=mnist'], "unknown dataset 'mnist'; choose from mnist1d, digits, cifar10"),
  (['--rho=-1'], '--rho must be >= 0, got -1.0'),
  (['--lr=0'], '--lr must be > 0, got 0.0'),
  (['--momentum=1'], '--momentum must be in [0, 1), got 1.0'),
  (['--lmbda=2'], '--lmbda must be in [0, 1], got 2.0'),
  (['--label-noise=1'], '--label-noise must be in [0, 1), got 1.0'),
  (['--epochs=0'], '--epochs must be an integer >= 1, got 0'),
  (['--sharpness-every=-1'], '--sharpness-every must be an integer >= 0, got -1'),
  (['--epochs=ten'], "argument --epochs: must be an integer, got 'ten'"),
  (['--rho=big'], "argument --rho: must be a number, got 'big'"),
  (['--lr-schedule=step'], "unknown lr schedule 'step'; choose from cosine, constant"),
  (['--dataset=digits', '--num-samples=100'], '--num-samples applies to mnist1d only'),
  (['--frobnicate'], 'unrecognized arguments: --frobnicate'),
  (['--optimizer=sam', '--compare=sgd,sam'], 'not allowed with argument'),
  (['--dataset=digits', '--batch-size=5000'], '--batch-size must be at most the 1437 training'),
  (['--dataset=digits', '--resume'], '--resume: no checkpoint in'),
]


@pytest.mark.parametrize(('argv', 'message'), BAD_INPUT)
def test_bad_input_is_one_line_on_stderr_and_writes_nothing(tmp_path, capsys, argv, message):
  workdir = tmp_path / 'runs' / 'x'
  assert main_lib.main([*argv, f'--workdir={workdir}']) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.startswith('error: ') and captured.err.count('\n') == 1
  assert message in captured.err
  assert not (tmp_path / 'runs').exists()


def test_unusable_workdir_is_refused_before_anything_is_written(tmp_path, capsys):
  blocker = _file(tmp_path)
  for workdir in (blocker, blocker / 'run'):
    assert main_lib.main(['--dataset=digits', f'--workdir={workdir}']) == 2
    err = capsys.readouterr().err
    assert err == f'error: --workdir {workdir} is not usable: {blocker} is a file, not a folder\n'
  assert blocker.read_text() == 'not a folder'


def test_read_only_workdir_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
  # (root may write anywhere, so the permission check is simulated)
  real_access = main_lib.os.access
  monkeypatch.setattr(
    main_lib.os, 'access', lambda path, mode: False if path == tmp_path else real_access(path, mode)
  )
  workdir = tmp_path / 'runs' / 'sam'
  assert main_lib.main(['--dataset=digits', f'--workdir={workdir}']) == 2
  err = capsys.readouterr().err
  assert (
    err == f'error: --workdir {workdir} is not writable: no permission to write in {tmp_path}\n'
  )
  assert list(tmp_path.iterdir()) == []


def test_missing_dataset_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  assert main_lib.main(['--dataset=cifar10', f'--workdir={tmp_path / "c"}']) == 2
  err = capsys.readouterr().err
  assert err == (
    'error: dataset cifar10 needs tensorflow-datasets, which is not installed; '
    'install it with: pip install tensorflow-datasets tensorflow\n'
  )
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', FakeTfds(fail=True))
  assert main_lib.main(['--dataset=cifar10', f'--workdir={tmp_path / "c"}']) == 2
  assert (
    'error: dataset cifar10 is not prepared in ~/tensorflow_datasets' in capsys.readouterr().err
  )
  assert not (tmp_path / 'c').exists()


def test_command_line_error_has_no_traceback(tmp_path):
  result = subprocess.run(
    [sys.executable, '-m', 'optax_sam.examples.train', '--optimizer', 'sam+gsam'],
    capture_output=True,
    text=True,
    cwd=tmp_path,
  )
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.startswith("error: unknown optimizer 'sam+gsam'; choose from sgd")
  assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
  assert list(pathlib.Path(tmp_path).iterdir()) == []


def test_the_main_job_as_the_readme_runs_it_reaches_80_percent(tmp_path):
  """``python -m optax_sam.examples.train`` with no flags: MNIST-1D generated, >= 80% test accuracy.

  The issue's bar for the default run; the README states the figure measured on one machine.
  """
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as users run it
  env['XDG_CACHE_HOME'] = str(tmp_path / 'cache')  # generate MNIST-1D from scratch
  result = subprocess.run(
    [sys.executable, '-m', 'optax_sam.examples.train'],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=env,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  last = result.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r'final test accuracy: (\d\.\d{4})', last)
  assert match, last
  metrics = json.loads((tmp_path / 'runs' / 'mnist1d-sam' / reporting.METRICS_FILE).read_text())
  assert metrics['dataset'] == {'name': 'mnist1d', 'train_examples': 4000, 'test_examples': 1000}
  assert len(metrics['history']) == 20 and metrics['config']['optimizer'] == 'sam'
  assert float(match.group(1)) == round(metrics['final']['test_accuracy'], 4) >= 0.80
  assert (tmp_path / 'cache' / 'optax_sam').is_dir()
