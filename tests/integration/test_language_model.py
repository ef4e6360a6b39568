"""The language-model example in quick mode: four optimizers, paired seeds, the report's numbers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from optax_sam.examples import language_model as lm


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp('lm')
  assert lm.main(['--quick', '--out', str(out)]) == 0
  return json.loads((out / 'language_model.json').read_text()), (out / 'language_model.md')


def test_quick_run_reports_every_optimizer_on_paired_seeds(quick):
  document, markdown = quick
  assert [r['name'] for r in document['runs']] == list(lm.OPTIMIZERS)
  seeds = document['setting']['seeds']
  for run in document['runs']:
    assert [c['step'] for c in run['curve']] == [10, 20]
    assert len(run['final_validation_loss']) == len(seeds)
    assert run['seconds_per_step'] > 0
    for values in run['measures'].values():
      assert len(values) == len(seeds) and np.all(np.isfinite(values))
    assert all(0 <= s <= 1 for s in run['measures']['logit_path_share'])
  rows = {row['name']: row for row in document['summary']}
  for name, row in rows.items():
    loss = np.asarray(
      next(r for r in document['runs'] if r['name'] == name)['final_validation_loss']
    )
    assert row['perplexity'][0] == pytest.approx(float(np.exp(loss).mean()))
    adamw = np.asarray(document['runs'][0]['final_validation_loss'])
    assert row['minus_adamw'][0] == pytest.approx(float((loss - adamw).mean()))
  assert rows['adamw']['cost_vs_adamw'] == 1.0
  text = markdown.read_text()
  assert all(f'| {name} |' in text for name in lm.OPTIMIZERS)
  assert document['corpus']['vocabulary'] == 94


def test_the_functional_steps_use_the_clean_output_gradient():
  """functional_sam's update is SAM's with J(w + e)^T dl/df(w); plain SAM's differs."""
  setting = lm.QUICK
  train, _, vocabulary = lm.load_corpus()
  init, apply = lm.model_functions(len(vocabulary), setting)
  params = init(jax.random.key(0))
  batch = lm.random_batch(jnp.asarray(train), jax.random.key(1), setting)
  updates = {}
  tx = optax_sam.sam(optax.sgd(1.0), setting.rho)  # SGD at rate 1: the update is -g_sam
  for name in ('sam', 'functional_sam'):
    new_params, _, _ = lm.make_step(name, tx, apply, setting)(params, tx.init(params), batch)
    updates[name] = jax.tree.map(jnp.subtract, new_params, params)
  tokens, targets = batch
  grads = jax.grad(lambda p: lm.cross_entropy(apply(p, tokens), targets))(params)
  scale = setting.rho / (optax.tree.norm(grads) + 1e-12)
  perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
  clean_logits_grad = jax.grad(lambda z: lm.cross_entropy(z, targets))(apply(params, tokens))
  _, pullback = jax.vjp(lambda p: apply(p, tokens), perturbed)
  (g_fsam,) = pullback(clean_logits_grad)
  want = jax.tree.map(jnp.negative, g_fsam)
  distance = lambda a, b: float(optax.tree.norm(optax.tree.sub(a, b)))
  assert distance(updates['functional_sam'], want) < 1e-5 * float(optax.tree.norm(want))
  assert distance(updates['sam'], want) > 1e-3 * float(optax.tree.norm(want))


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--optimizers', 'adam'], "unknown optimizer 'adam'"),
    (['--width', '10', '--heads', '4'], 'multiple of --heads'),
    (['--steps', '0'], '--steps must be at least 1'),
    (['--steps', '25', '--eval-every', '10'], 'multiple of --eval-every'),
  ],
)
def test_bad_options_say_what_is_wrong(flags, message, capsys):
  assert lm.main(['--quick', *flags]) == 2
  assert message in capsys.readouterr().err
