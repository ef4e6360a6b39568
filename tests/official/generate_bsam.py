"""Reference trajectories of bSAM from its authors' JAX code (team-approx-bayes/bayesian-sam).

The authors' code is JAX, so it runs in the project's own environment (float64):

  .venv/bin/python tests/official/generate_bsam.py --out tests/official

``optim.py`` and ``util.py`` are read unmodified from a checkout of the repository (a work tree or
a bare git directory; ``BSAM_SRC``, else this machine's snapshot under /work/.mirror), checked by
sha256 and imported from a temporary folder; nothing of theirs is copied into this project (their
licence is the GPL-3.0). One name that newer JAX removed is given back before the import
(``jax.tree_map``, as ``jax.tree.map``), which changes nothing they compute. Only the loop below is
ours: ``build_bsam_optimizer``'s ``init`` and ``step``, as ``train.py`` calls them, with a learning
rate factor per step as its cosine schedule passes.

The problem is the one of generate.py (README.md in this folder): float64,
``{'kernel': (5, 3), 'bias': (3,), 'scale': (3,)}``, ``loss = mean((tanh((x @ kernel + bias) *
scale) - y) ** 2)`` on one batch of 16 drawn by ``numpy.random.default_rng(0)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax

jax.config.update('jax_enable_x64', True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import vendor  # noqa: E402 - this folder's; on sys.path when the script runs

SOURCE = {
  'repository': 'team-approx-bayes/bayesian-sam',
  'commit': '936eec17f5f560d032f924c3c1c79763edc3d30d',
  'file': 'optim.py',
  'file_last_changed_in': '99d994281083f156cef5809101ca3806f7edb501',
  'license': 'GPL-3.0 (LICENSE at the repository root): not copied here, only run',
  'env': 'BSAM_SRC',
  'mirror': 'team-approx-bayes+bayesian-sam',
  'files': {
    'optim.py': '56a11650c5e0ae752cae973182c62f49d40b56a75531f85e88aca608315efb77',
    'util.py': 'd52c6fe4d6a1128114d7bb82542d004636968b03482c8bf16792d0965031c07a',
  },
}
STEPS = 5
LR_FACTORS = [1.0, 0.9, 0.7, 0.5, 0.3]  # what train.py's schedule passes as lrfactor, per step
# Hyperparameters of build_bsam_optimizer (but lossgrad) that make every term of the update count.
SMALL = dict(
  learningrate=0.1, beta1=0.8, beta2=0.9, wdecay=0.01, rho=0.05, Ndata=1000, s_init=1.0, damping=0.1
)
CASES = [  # (name, hyperparameters, rng seed)
  ('whole batch', {**SMALL, 'msharpness': 1}, 0),
  ('batchsplit 4', {**SMALL, 'msharpness': 4}, 1),
  (
    'defaults of train.py',
    {**SMALL, 'learningrate': 0.5, 'beta1': 0.9, 'beta2': 0.999, 'wdecay': 25.0 / 500,
     'rho': 0.1, 'msharpness': 2, 'Ndata': 500},
    2,
  ),
]  # fmt: skip


def _vendored() -> dict:
  vendor.put_on_path(SOURCE, 'bsam')
  return {k: SOURCE[k] for k in ('repository', 'commit', 'file', 'file_last_changed_in', 'license')}


def problem() -> dict:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 5))
  y = rng.normal(size=(16, 3))
  kernel = 0.5 * rng.normal(size=(5, 3))
  scale = 1 + 0.1 * rng.normal(size=(3,))
  return dict(x=x, y=y, params=dict(kernel=kernel, bias=np.full((3,), 0.1), scale=scale))


def run_case(hyper: dict, seed: int, data: dict) -> dict:
  import optim  # the official file, unmodified

  def loss(params, netstate, minibatch, is_training):
    del is_training
    x, y = minibatch
    out = jnp.tanh((x @ params['kernel'] + params['bias']) * params['scale'])
    return jnp.mean((out - y) ** 2), netstate

  init, step = optim.build_bsam_optimizer(jax.value_and_grad(loss, has_aux=True), **hyper)
  params = jax.tree.map(jnp.asarray, data['params'])
  key = jax.random.PRNGKey(seed)
  trainstate = init(params, {}, key)
  batch = (jnp.asarray(data['x']), jnp.asarray(data['y']))
  steps = []
  for factor in LR_FACTORS[:STEPS]:
    trainstate, loss_value = step(trainstate, batch, factor)
    opt = trainstate.optstate
    steps.append(
      dict(
        params={k: np.asarray(v).tolist() for k, v in opt['w'].items()},
        momentum={k: np.asarray(v).tolist() for k, v in opt['gm'].items()},
        precision={k: np.asarray(v).tolist() for k, v in opt['s'].items()},
        key=np.asarray(trainstate.rngkey).tolist(),
        loss=float(loss_value),
      )
    )
  return dict(hyperparameters=hyper, seed=seed, lr_factors=LR_FACTORS[:STEPS], steps=steps)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parent)
  args = parser.parse_args()
  official = _vendored()
  data = problem()
  doc = dict(
    method='bsam',
    official=official,
    jax_version=jax.__version__,
    python_version=platform.python_version(),
    dtype='float64',
    problem=dict(
      x=data['x'].tolist(),
      y=data['y'].tolist(),
      init_params={k: v.tolist() for k, v in data['params'].items()},
    ),
    num_steps=STEPS,
    training_loop=(
      'build_bsam_optimizer(jax.value_and_grad(loss, has_aux=True), **hyperparameters); '
      'trainstate = init(params, {}, jax.random.PRNGKey(seed)); then per step '
      'step(trainstate, (x, y), lr_factors[i]), the whole batch every step (train.py splits it '
      'into msharpness groups inside step)'
    ),
    trajectory_fields=(
      'steps[i]: params (w), momentum (gm), precision (s) and key after step i + 1, and the '
      'loss the step returned (the mean over groups of the loss at the perturbed point)'
    ),
    cases=[dict(name=name, **run_case(hyper, seed, data)) for name, hyper, seed in CASES],
  )
  path = args.out / 'bsam.json'
  path.write_text(json.dumps(doc, indent=1) + '\n')
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  if not hasattr(jax, 'tree_map'):
    jax.tree_map = jax.tree.map  # removed in newer JAX; the official files call it
  sys.exit(main())
