"""The example's micro-batch options: --m-sharpness M (with --group-route) and --accumulate K."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from optax_sam.examples import main as main_lib
from optax_sam.examples import train
from tests.integration.test_example import TINY, TINY_FLAGS, digits, key_data_leaves  # noqa: F401

NO_DROPOUT = dataclasses.replace(TINY, dropout=0.0)


def _setup(config, dataset):
  model = train.create_model(config, dataset)
  # As train_and_evaluate builds it (constant schedule): one compiled step per setting.
  tx = train._shared_optimizer(train._optimizer_key(config), 1)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return model, optimizer


def _batches(dataset, count=2):
  size = NO_DROPOUT.batch_size
  return [
    (jnp.asarray(dataset.x_train[i * size : (i + 1) * size]),
     jnp.asarray(dataset.y_train[i * size : (i + 1) * size]))
    for i in range(count)
  ]  # fmt: skip


def _train(config, dataset, step):
  model, optimizer = _setup(config, dataset)
  losses = [step(model, optimizer, x, y)[0] for x, y in _batches(dataset)]
  return nnx.as_pure(nnx.state(model)), nnx.as_pure(optimizer.opt_state), losses


def _assert_close(a, b, atol):
  for u, v in zip(key_data_leaves(a), key_data_leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=0, atol=atol)


@pytest.mark.parametrize(
  'options',
  [
    dict(m_sharpness=64),
    dict(accumulate=1),
  ],
)
def test_one_micro_batch_is_the_plain_step(digits, options):  # noqa: F811
  config = dataclasses.replace(NO_DROPOUT, **options).validate()
  plain = dataclasses.replace(config, m_sharpness=None, accumulate=None)
  ours = _train(config, digits, train._train_step(config))
  theirs = _train(plain, digits, train.train_step)
  assert train._train_step(plain) is train.train_step
  _assert_close(ours, theirs, atol=2e-6)  # model (BatchNorm statistics too), optimizer, losses


def test_group_routes_take_the_same_steps_with_dropout(digits):  # noqa: F811
  """F-SAM (its EMA follows the groups' mean clean gradient); each group its own dropout masks."""
  config = dataclasses.replace(TINY, optimizer='fsam', dropout=0.3, m_sharpness=16).validate()
  assert config.group_route == 'scan'  # the default
  scan = _train(config, digits, train._train_step(config))
  vmap = dataclasses.replace(config, group_route='vmap').validate()
  _assert_close(scan, _train(vmap, digits, train._train_step(vmap)), atol=2e-6)


def _group_grads(model, x, y, size):
  """Each micro-batch's train-mode gradient, from a loss written without the example's helpers."""
  graphdef, state = nnx.split(model)
  state = nnx.as_pure(state)

  def loss(params, x, y):
    copy = nnx.merge(graphdef, state)
    nnx.update(copy, params)
    return train.loss_fn(copy, x, y)[0]

  def grads(params):
    return [
      jax.grad(loss)(params, x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)
    ]

  return jax.jit(grads)


@pytest.mark.parametrize('mode', ['m-sharpness', 'accumulate'])
def test_a_step_equals_its_formula(digits, mode):  # noqa: F811
  """m-sharpness: w' = base(mean_j grad_j(w + rho g_j / |g_j|)); accumulation: one e for all."""
  size, rho = 16, 0.05
  flag = dict(m_sharpness=size) if mode == 'm-sharpness' else dict(accumulate=64 // size)
  config = dataclasses.replace(NO_DROPOUT, **flag).validate()
  (x, y), = _batches(digits, count=1)  # fmt: skip
  model, optimizer = _setup(config, digits)
  train._train_step(config)(model, optimizer, x, y)

  by_hand, _ = _setup(config, digits)
  params = nnx.as_pure(nnx.state(by_hand, nnx.Param))
  grads = _group_grads(by_hand, x, y, size)
  mean = lambda trees: jax.tree.map(lambda *g: sum(g) / len(g), *trees)
  ascend = lambda g: optax.tree.add_scale(params, rho / optax.tree.norm(g), g)
  clean = grads(params)
  if mode == 'accumulate':
    adv = mean(grads(ascend(mean(clean))))
  else:
    adv = mean([grads(ascend(g))[j] for j, g in enumerate(clean)])
  kernels = lambda p: jax.tree.map(lambda w: w.ndim > 1, p)
  base = optax.chain(
    optax.add_decayed_weights(config.weight_decay, mask=kernels),
    optax.sgd(config.lr, momentum=config.momentum),
  )
  updates, _ = base.update(adv, base.init(params), params)
  _assert_close(
    nnx.as_pure(nnx.state(model, nnx.Param)), optax.apply_updates(params, updates), atol=2e-6
  )
  # The running statistics come from one forward pass over the whole batch.
  train.loss_fn(by_hand, x, y)
  stats = lambda m: nnx.as_pure(nnx.state(m, nnx.BatchStat))
  _assert_close(stats(model), stats(by_hand), atol=1e-6)


def test_a_run_with_m_sharpness_then_a_resume_that_changes_it(tmp_path, capsys):
  flags = [*TINY_FLAGS, '--dropout=0', f'--workdir={tmp_path}', '--m-sharpness=16']
  assert main_lib.main(flags) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith('final test accuracy: ')
  assert main_lib.main([*flags, '--resume', '--m-sharpness=32', '--epochs=2']) == 2
  assert '--m-sharpness 16 -> 32' in capsys.readouterr().err


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (['--m-sharpness=0'], '--m-sharpness must be an integer >= 1, got 0'),
    (['--accumulate=3'], '--accumulate must divide --batch-size 128, got 3'),
    (['--m-sharpness=48'], '--m-sharpness must divide --batch-size 128, got 48'),
    (['--m-sharpness=8', '--accumulate=2'], '--m-sharpness and --accumulate are exclusive'),
    (['--optimizer=sgd', '--m-sharpness=8'], 'sgd takes none'),
    (['--optimizer=msam', '--m-sharpness=8'], 'msam takes none'),
    (['--group-route=vmap'], '--group-route applies to --m-sharpness only'),
    (['--m-sharpness=8', '--group-route=loop'], "unknown group route 'loop'"),
  ],
)
def test_bad_micro_batch_flags_are_one_line_errors(tmp_path, capsys, argv, message):
  assert main_lib.main([*argv, f'--workdir={tmp_path / "x"}']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and message in err
  assert not (tmp_path / 'x').exists()


def test_every_documented_command_parses():
  """The commands of docs/example.md's code blocks (not its list of bad input) are valid."""
  import pathlib
  import shlex

  lines = (pathlib.Path(__file__).parents[2] / 'docs' / 'example.md').read_text().splitlines()
  prefix, in_block, commands = 'python -m optax_sam.examples.main', False, []
  for line in lines:
    in_block ^= line.startswith('```')
    if in_block and line.startswith(prefix):
      commands.append(line.split('#')[0].rstrip(' &'))
  assert len(commands) >= 8 and any('--m-sharpness' in c for c in commands)
  for command in commands:
    main_lib.make_plan(shlex.split(command)[len(prefix.split()) :])


def test_documented_errors_are_the_ones_printed(tmp_path, capsys):
  """docs/example.md's "Bad input" lines are what the example prints (not the machine-specific)."""
  import pathlib
  import shlex

  lines = (pathlib.Path(__file__).parents[2] / 'docs' / 'example.md').read_text().splitlines()
  pairs = [
    (command[len('$ python -m optax_sam.examples.main ') :], error)
    for command, error in zip(lines, lines[1:], strict=False)
    if command.startswith('$ python -m optax_sam.examples.main') and error.startswith('error: ')
  ]
  portable = [(c, e) for c, e in pairs if '--workdir' not in c and 'cifar10' not in c]
  assert len(portable) >= 3
  for command, error in portable:
    assert main_lib.main([*shlex.split(command), f'--workdir={tmp_path / "x"}']) == 2
    assert capsys.readouterr().err.strip() == error


def test_main_and_train_are_the_same_command():
  """``python -m optax_sam.examples.train`` runs main.py's command, under its own name."""
  import subprocess
  import sys

  helps = {}
  for module in ('main', 'train'):
    helps[module] = subprocess.run(
      [sys.executable, '-m', f'optax_sam.examples.{module}', '--help'],
      capture_output=True,
      text=True,
      check=True,
    ).stdout
    assert helps[module].startswith(f'usage: python -m optax_sam.examples.{module} ')
  assert helps['main'].split('\noptions:')[1] == helps['train'].split('\noptions:')[1]


def test_the_default_rho_of_each_optimizer_is_the_library_alias_default():
  import inspect

  import optax_sam
  from optax_sam.examples import config as config_lib

  default = lambda alias, name='rho': inspect.signature(alias).parameters[name].default
  expected = {
    'sgd': 0.0,
    'sam': default(optax_sam.sam),
    'stablesam': default(optax_sam.sam),
    'asam': default(optax_sam.asam),
    'fsam+asam': default(optax_sam.asam),
    'fsam': default(optax_sam.friendly_sam),
    'gsam': default(optax_sam.gsam),
    'looksam': default(optax_sam.look_sam),
    'msam': default(optax_sam.momentum_sam),
  }
  got = {name: config_lib.Config(optimizer=name).resolved_rho for name in expected}
  assert got == expected
  assert config_lib.Config().resolved_eta == default(optax_sam.asam, 'eta')
