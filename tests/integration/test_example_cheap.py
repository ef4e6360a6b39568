"""The example's cheaper SAM options: --optimizer looksam/msam, --sam-every, --sam-after."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import optax_sam
from optax_sam.examples import config as config_lib
from optax_sam.examples import main as main_lib
from optax_sam.examples import train
from tests.integration.test_example import (  # noqa: F401
  BASE,
  TINY,
  TINY_FLAGS,
  assert_same_steps,
  digits,
  key_data_leaves,
  restored_state,
)


def _base():
  kernels = lambda p: jax.tree.map(lambda w: w.ndim > 1, p)
  return optax.chain(
    optax.add_decayed_weights(BASE['weight_decay'], mask=kernels),
    optax.sgd(BASE['lr'], momentum=BASE['momentum']),
  )


CASES = {
  'looksam': (dict(optimizer='looksam'), lambda: optax_sam.look_sam(_base(), 0.1, 0.7, k=5)),
  'looksam k=2': (
    dict(optimizer='looksam', sam_every=2, look_alpha=0.3),
    lambda: optax_sam.look_sam(_base(), 0.1, 0.3, k=2),
  ),
  'msam': (dict(optimizer='msam'), lambda: optax_sam.momentum_sam(_base(), 0.3)),
  'sam every 2': (
    dict(optimizer='sam', sam_every=2),
    lambda: optax_sam.sam(_base(), 0.05, when=optax_sam.every(2)),
  ),
  'fsam after 0.5': (  # 2 epochs of 10 steps: plain steps 0..9
    dict(optimizer='fsam', sam_after=0.5, epochs=2),
    lambda: optax_sam.friendly_sam(_base(), 0.05, when=optax_sam.after(10)),
  ),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_create_optimizer_builds_the_cheap_variants(case):
  options, expected = CASES[case]
  config = config_lib.Config(lr_schedule='constant', **BASE, **options).validate()
  ours, theirs = train.create_optimizer(config, steps_per_epoch=10), expected()
  assert_same_steps(ours, theirs, 12)


def test_msam_evaluates_and_checkpoints_the_clean_weights(tmp_path, digits):  # noqa: F811
  config = dataclasses.replace(TINY, optimizer='msam', epochs=2)
  metrics = train.train_and_evaluate(
    config, tmp_path, dataset=digits, progress=False, log=lambda _: None
  )
  model, optimizer, state, _ = restored_state(tmp_path, config, digits)  # model: clean weights
  held = nnx.as_pure(state['held'])
  clean = optax_sam.clean_params(held, nnx.as_pure(optimizer.opt_state))
  saved = nnx.as_pure(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(saved), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(
    jax.tree.leaves(held), jax.tree.leaves(saved), strict=True)) > 1e-4  # fmt: skip
  _, accuracy = train.evaluate(model, digits.x_test, digits.y_test)
  assert accuracy == metrics['history'][-1]['test_accuracy']


def test_msam_resume_reaches_the_same_state_as_a_straight_run(tmp_path, digits):  # noqa: F811
  one = dataclasses.replace(TINY, optimizer='msam')
  two = dataclasses.replace(one, epochs=2)
  train.train_and_evaluate(two, tmp_path / 'a', dataset=digits, progress=False, log=lambda _: None)
  train.train_and_evaluate(one, tmp_path / 'b', dataset=digits, progress=False, log=lambda _: None)
  train.train_and_evaluate(
    two, tmp_path / 'b', dataset=digits, resume=True, progress=False, log=lambda _: None
  )
  states = [restored_state(tmp_path / run, two, digits)[2] for run in ('a', 'b')]
  for a, b in zip(key_data_leaves(states[0]), key_data_leaves(states[1]), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('flags', [['--optimizer=looksam', '--sam-every=2'], ['--sam-after=0.5']])
def test_short_runs_with_the_new_flags(tmp_path, capsys, flags):
  assert main_lib.main([*TINY_FLAGS, '--epochs=2', f'--workdir={tmp_path}', *flags]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith('final test accuracy: ')


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (['--sam-every=0'], '--sam-every must be an integer >= 1, got 0'),
    (['--sam-after=1.5'], '--sam-after must be in [0, 1], got 1.5'),
    (['--sam-every=2', '--sam-after=0.5'], '--sam-every and --sam-after are exclusive'),
    (['--optimizer=msam', '--sam-every=2'], 'msam takes no second gradient'),
    (['--optimizer=sgd', '--sam-after=0.5'], 'sgd takes no second gradient'),
    (['--optimizer=looksam', '--sam-after=0.5'], 'does not apply to looksam'),
    (['--look-alpha=-1'], '--look-alpha must be >= 0, got -1.0'),
  ],
)
def test_bad_cheap_flags_are_one_line_errors(tmp_path, capsys, argv, message):
  assert main_lib.main([*argv, f'--workdir={tmp_path / "x"}']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and message in err
  assert not (tmp_path / 'x').exists()
