"""Reference trajectories from the authors' official PyTorch code, in float64.

Regenerate every JSON file next to this script with one command (a CPU build of torch is enough):

  /tmp/torchvenv/bin/python tests/official/generate.py --out tests/official

The official optimizers run unmodified, read from a checkout of each repository (a work tree or a
bare git directory) named by an environment variable (``WSAM_SRC``, ``VASSO_SRC``,
``UNIFIED_SAM_SRC``, ``LOOKBEHIND_SAM_SRC``, ``GCSAM_SRC``/``--gcsam-src``,
``SAMON_SRC``/``--samon-src``), else from this machine's snapshots under /work/.mirror; each file's
sha256 is checked against the recorded one. Nothing of theirs is copied into this project.
Only the training loops below are ours, each following its repository's own
training script. See README.md in this folder.

The problem (the same for every file): float64, params in JAX/Flax orientation
``{'kernel': (5, 3), 'bias': (3,), 'scale': (3,)}``, ``out = tanh((x @ kernel + bias) * scale)``,
``loss = mean((out - y) ** 2)`` on one fixed batch, drawn with ``numpy.random.default_rng(0)`` in
this order: x (16, 5) normal, y (16, 3) normal, kernel = 0.5 * normal (5, 3), scale = 1 + 0.1 *
normal (3,); bias = 0.1 everywhere. In torch the parameters are ``linear.weight`` = kernel.T (3, 5),
``linear.bias`` and ``norm.weight`` = scale (SAM-ON picks normalization parameters by name:
'norm' or 'bn' in the name; ASAM scales parameters whose name contains 'weight').
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import vendor  # this folder's; on sys.path when the script runs

HERE = Path(__file__).resolve().parent

STEPS = 5
BASE = {'lr': 0.1, 'momentum': 0.9, 'dampening': 0.0, 'weight_decay': 0.0, 'nesterov': False}

SOURCES = {
  'wsam': {
    'repository': 'intelligent-machine-learning/atorch',
    'commit': '7fb7da86be5794c57440db5b96f3278c158f0c7a',
    'file': 'atorch/optimizers/wsam.py',
    'file_last_changed_in': 'aeba1f1cbb363268028f309d3c18dec07570d73d',
    'license': 'Apache-2.0 (LICENSE at the repository root): redistribution allowed',
    'env': 'WSAM_SRC',
    'mirror': 'intelligent-machine-learning+atorch',
    'files': {
      'atorch/optimizers/wsam.py': (
        '204ac83afcdde96af0538f23934b0fc61e7b47046cc66a25f66ea55303f06fa6'
      ),
      'atorch/optimizers/utils.py': (
        'add13e9194046fe43cc72a2202ee1a44767e0bce262ab3daca3cfc4f19bf30a6'
      ),
    },
  },
  'vasso': {
    'repository': 'BingcongLi/VaSSO',
    'commit': '3524bad45d63bb687120708abfef4d5842b7bf36',
    'file': 'solver/vasso.py',
    'file_last_changed_in': 'c68bcb0423c8e3332b08f01ffa4ce7dbc31f1a5d',
    'license': 'MIT (LICENSE at the repository root): redistribution allowed',
    'env': 'VASSO_SRC',
    'mirror': 'BingcongLi+VaSSO',
    'files': {
      'solver/vasso.py': 'b86e462a706f762ed2c512b2c7395c09fb8a9e5c5ec102f68e5a9213d9cf01c5',
      'solver/build.py': '3d269bb67ce9e8853462b1805bd1b1041f2ba5495e817832e1217172a473e822',
      'solver/__init__.py': '4ec0b49f5d9b1d6e12102369ec20ce379bb0ca6859e728f5cf7f48a34679cb09',
      'solver/sam.py': '34c233cc5c23149b139591faafd88d47bbf40a05b2bfad3dde8532f526c3097f',
      'solver/lr_scheduler.py': '0ac11cf22711c3afda1fcbe6dc3911355c36085164597948677801d572d63e23',
      'utils/configurable.py': '2563b2f8c669d9fd6853e7d1f751e0996f9772286b8018cb7ebabe6d6f3bd296',
      'utils/register.py': 'c46839d3bd05222b656dc738d5d8a96ec9af46fbed85bb423e7ffbfb65539c75',
    },
  },
  'gcsam': {
    'repository': 'Mohamed-Hassan22/GCSAM',
    'commit': 'ea7c117e46fd0da2ba17e53f2292e7e50ef4e4d1',
    'file': 'cifar10_gcsam_resnet50.py',
    'file_last_changed_in': '835c2b49ca3b334b7010048e03adb950d6e3be52',
    'license': 'none found (no LICENSE file, no licence text in README): not copied here',
    'flag': '--gcsam-src',
    'env': 'GCSAM_SRC',
    'mirror': 'Mohamed-Hassan22+GCSAM',
    'sha256': 'da86851f47c44a2040313bac388bb6f4d9a284903c8b58a74b384e8c2ec5580e',
  },
  'unified_sam': {
    'repository': 'dimitris-oik/unifiedsam',
    'commit': '978ce393d33c23e8fd10f04eb38643a7a0631767',
    'file': 'unifiedsam.py',
    'file_last_changed_in': '1388bbb2b0ac3d8f51592f929930e6b7bded24d1',
    'license': 'MIT (LICENSE at the repository root): redistribution allowed',
    'env': 'UNIFIED_SAM_SRC',
    'mirror': 'dimitris-oik+unifiedsam',
    'files': {
      'unifiedsam.py': '1d65aa5de756f0b3449f8c04f136a44311f57a2e9f5ca71093cc8c60ead3db08',
    },
  },
  'sam_on': {
    'repository': 'mueller-mp/SAM-ON',
    'commit': '8b8869ad1e03a83cc9e71bf4bca605ecc9f89080',
    'file': 'sam_on.py',
    'file_last_changed_in': 'd0fa4c9874a7c900bdc210c57511b6cf9bc891e9',
    'license': (
      "none found (no LICENSE file; the README's 'License' heading is empty): not copied here"
    ),
    'flag': '--samon-src',
    'env': 'SAMON_SRC',
    'mirror': 'mueller-mp+SAM-ON',
    'sha256': '81e163e73a1d1127174c6b4ed3de307685ec3a9a187cdf73748a6089fcbd2ad6',
  },
  'lookbehind_sam': {
    'repository': 'chandar-lab/Lookbehind-SAM',
    'commit': 'ac7c5af37b1c7a98f1d9107ee60a5742b04b510f',
    'file': 'lookbehind.py',
    'file_last_changed_in': 'dcc62e4fc896d54c29c15506f62658792660f96b',
    'license': 'Apache-2.0 (LICENSE at the repository root): redistribution allowed',
    'env': 'LOOKBEHIND_SAM_SRC',
    'mirror': 'chandar-lab+Lookbehind-SAM',
    'files': {
      'lookbehind.py': '21d726a676527e5a2d7afc3b02e6684383f1760757e49788bbd20764b1bfa33c',
    },
  },
  'sampa': {
    'repository': 'LIONS-EPFL/SAMPa',
    'commit': '01093ef6eb35af2eefa62b618bfcae16fb4a73d7',
    'file': 'train.py',
    'file_last_changed_in': '9fd7534182dfb12127323c4ea45750bafcbbd5b6',
    'license': 'none found (no LICENSE file, no licence text in README): not copied here',
    'env': 'SAMPA_SRC',
    'mirror': 'LIONS-EPFL+SAMPa',
    'files': {
      'train.py': '09d9d24c4868940a6db2169b1a70e166d27db84da9ba5525f5bd9d3207b9ff4b',
      'utility.py': '811016a9bed32aa9b8e05dd335dd6d6cda9ed1e1e142fff2c05e92866f8e3afc',
    },
  },
}


# ---------------------------------------------------------------------------------------------
# Loading the official code.


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def _vendored(method: str) -> dict:
  """Puts the official files on sys.path, read unmodified from a checkout of their repository
  (:func:`vendor.put_on_path`), and returns their provenance."""
  spec = SOURCES[method]
  vendor.put_on_path(spec, method)
  return vendor.provenance(spec)


def _git(*args: str) -> str:
  return subprocess.run(['git', *args], check=True, capture_output=True, text=True).stdout


def _external(method: str, given: str | None) -> tuple[str, dict]:
  """The source text of an unlicensed official file, from a path the user gives."""
  spec = SOURCES[method]
  path = given or os.environ.get(spec['env'])
  if path is None and (vendor.MIRROR / spec['mirror'] / 'repo').is_dir():
    path = str(vendor.MIRROR / spec['mirror'] / 'repo')
  if path is None:
    raise FileNotFoundError(
      f'{method}: give the {spec["repository"]} checkout with {spec["flag"]} or {spec["env"]} '
      f'(git clone https://github.com/{spec["repository"]} && git checkout {spec["commit"]})'
    )
  p = Path(path)
  if p.is_file():
    text, commit, where = p.read_text(), 'unknown (a file was given)', str(p)
  elif (p / 'HEAD').is_file() and (p / 'objects').is_dir():  # a bare git directory
    try:
      _git('--git-dir', str(p), 'cat-file', '-e', spec['commit'])
      rev = spec['commit']
    except subprocess.CalledProcessError:
      rev = 'HEAD'
    commit = _git('--git-dir', str(p), 'rev-parse', rev).strip()
    text = _git('--git-dir', str(p), 'show', f'{commit}:{spec["file"]}')
    where = f'{p} (bare git directory) at {commit}:{spec["file"]}'
  else:
    text = (p / spec['file']).read_text()
    try:
      commit = _git('-C', str(p), 'rev-parse', 'HEAD').strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
      commit = 'unknown (not a git checkout)'
    where = str(p / spec['file'])
  digest = _sha256(text)
  if digest != spec['sha256']:
    print(f'WARNING {method}: {where} has sha256 {digest}, expected {spec["sha256"]}')
  elif commit.startswith('unknown'):  # the same bytes as the file at the recorded commit
    where = f'{where} ({commit}; its sha256 is that of {spec["file"]} at {spec["commit"]})'
    commit = spec['commit']
  return text, {
    'repository': spec['repository'],
    'url': f'https://github.com/{spec["repository"]}',
    'commit': commit,
    'file': spec['file'],
    'file_last_changed_in': spec['file_last_changed_in'],
    'sha256': digest,
    'sha256_matches_expected': digest == spec['sha256'],
    'license': spec['license'],
    'loaded_from': where,
  }


# ---------------------------------------------------------------------------------------------
# The problem.


def make_problem() -> dict:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 5))
  y = rng.normal(size=(16, 3))
  kernel = 0.5 * rng.normal(size=(5, 3))
  bias = np.full((3,), 0.1)
  scale = 1.0 + 0.1 * rng.normal(size=(3,))
  return {'x': x, 'y': y, 'params': {'kernel': kernel, 'bias': bias, 'scale': scale}}


class Dense(torch.nn.Module):
  def __init__(self, kernel: np.ndarray, bias: np.ndarray):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.tensor(kernel.T.copy()))  # torch: (out, in)
    self.bias = torch.nn.Parameter(torch.tensor(bias.copy()))

  def forward(self, h):
    return torch.nn.functional.linear(h, self.weight, self.bias)


class Scale(torch.nn.Module):
  """Plays a normalization layer's affine weight; named `norm` in TinyNet for SAM-ON."""

  def __init__(self, scale: np.ndarray):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.tensor(scale.copy()))

  def forward(self, h):
    return h * self.weight


class TinyNet(torch.nn.Module):
  """tanh((x @ kernel + bias) * scale); parameters linear.weight, linear.bias, norm.weight."""

  def __init__(self, params: dict):
    super().__init__()
    self.linear = Dense(params['kernel'], params['bias'])
    self.norm = Scale(params['scale'])

  def forward(self, x):
    return torch.tanh(self.norm(self.linear(x)))


class Problem:
  def __init__(self):
    data = make_problem()
    self.data = data
    self.x = torch.tensor(data['x'])
    self.y = torch.tensor(data['y'])

  def model(self) -> TinyNet:
    return TinyNet(self.data['params'])

  def loss(self, model: TinyNet):
    return ((model(self.x) - self.y) ** 2).mean()

  def loss_per_element(self, model: TinyNet):  # SAM-ON's criterion has reduction='none'
    return (model(self.x) - self.y) ** 2


def params_of(model: TinyNet) -> dict:
  """JAX orientation: kernel = linear.weight.T."""
  return {
    'kernel': model.linear.weight.detach().numpy().T.copy(),
    'bias': model.linear.bias.detach().numpy().copy(),
    'scale': model.norm.weight.detach().numpy().copy(),
  }


def grads_of(model: TinyNet) -> dict:
  def g(p):
    return np.zeros(p.shape) if p.grad is None else p.grad.detach().numpy().copy()

  return {
    'kernel': g(model.linear.weight).T.copy(),
    'bias': g(model.linear.bias),
    'scale': g(model.norm.weight),
  }


def sub(a: dict, b: dict) -> dict:
  return {k: a[k] - b[k] for k in a}


def tree_norm(t: dict) -> float:
  return float(np.sqrt(sum(np.sum(v**2) for v in t.values())))


def to_json(obj):
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, dict):
    return {k: to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  return obj


def base_sgd(params):
  return torch.optim.SGD(params, **BASE)


# ---------------------------------------------------------------------------------------------
# WSAM (atorch): examples/optimizer/main.py train_wsam: loss = optimizer.step(closure);
# optimizer.zero_grad(). step() runs closure at w, first_step(zero_grad=True), closure at w + e,
# second_step().

WSAM_LOOP = (
  'per step (examples/optimizer/main.py, train_wsam): closure = forward, loss.backward(), return '
  'loss; loss = optimizer.step(closure); optimizer.zero_grad(). WeightedSAM(model, base_optimizer, '
  '**hyperparameters) with base_optimizer = torch.optim.SGD(model.parameters(), **base_optimizer).'
)


def run_wsam(prob: Problem, hp: dict) -> list:
  from atorch.optimizers.wsam import WeightedSAM

  model = prob.model()
  opt = WeightedSAM(model, base_sgd(model.parameters()), **hp)
  steps = []
  for _ in range(STEPS):
    w = params_of(model)
    seen = []

    def closure(model=model, seen=seen):
      seen.append(params_of(model))
      loss = prob.loss(model)
      loss.backward()
      seen.append(grads_of(model))
      return loss

    loss = opt.step(closure)
    opt.zero_grad()
    _, g, w_adv, g_adv = seen
    steps.append(
      {
        'loss': loss.item(),
        'params': params_of(model),
        'perturbation': sub(w_adv, w),
        'grad': g,
        'grad_adv': g_adv,
        'grad_norm': tree_norm(g),
        'grad_adv_norm': tree_norm(g_adv),
      }
    )
  return steps


WSAM_CASES = [
  ('decouple', {'rho': 0.05, 'gamma': 0.9, 'decouple': True}),
  ('couple', {'rho': 0.05, 'gamma': 0.9, 'decouple': False}),
  ('decouple_max_norm', {'rho': 0.05, 'gamma': 0.9, 'decouple': True, 'max_norm': 0.05}),
  ('couple_max_norm', {'rho': 0.05, 'gamma': 0.9, 'decouple': False, 'max_norm': 0.05}),
  ('decouple_adaptive', {'rho': 0.05, 'gamma': 0.9, 'decouple': True, 'adaptive': True}),
  ('decouple_adaptive_rho0.5_gamma0.5', {'rho': 0.5, 'gamma': 0.5, 'decouple': True,
                                         'adaptive': True}),
  ('couple_adaptive_max_norm', {'rho': 0.05, 'gamma': 0.9, 'decouple': False, 'adaptive': True,
                                'max_norm': 0.05}),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# VaSSO: utils/engine.py train_one_epoch: output = model(x); loss = criterion;
# optimizer.zero_grad(); loss.backward(); optimizer.step(closure) (closure: forward + backward,
# returns nothing). The optimizer is built by solver/build.py build_optimizer(args, model) with
# args.opt = 'vasso-sgd'.

VASSO_LOOP = (
  'optimizer, base = solver.build.build_optimizer(args, model) with args.opt="vasso-sgd" and the '
  'SGD arguments of base_optimizer (lr, weight_decay, nesterov, momentum; eps/betas None); per '
  'step (utils/engine.py): loss = criterion(model(x), y); optimizer.zero_grad(); loss.backward(); '
  'optimizer.step(closure) with closure = forward + backward.'
)


def run_vasso(prob: Problem, hp: dict) -> list:
  from solver.build import build_optimizer

  model = prob.model()
  args = argparse.Namespace(
    opt='vasso-sgd',
    lr=BASE['lr'],
    weight_decay=BASE['weight_decay'],
    nesterov=BASE['nesterov'],
    momentum=BASE['momentum'],
    eps=None,
    betas=None,
    **hp,
  )
  opt, _ = build_optimizer(args, model)
  steps = []
  for _ in range(STEPS):
    w = params_of(model)
    seen = []

    def closure(model=model, seen=seen):
      seen.append(params_of(model))
      prob.loss(model).backward()
      seen.append(grads_of(model))

    loss = prob.loss(model)
    opt.zero_grad()
    loss.backward()
    g = grads_of(model)
    opt.step(closure)
    w_adv, g_adv = seen
    ema = {
      'kernel': opt.state[model.linear.weight]['ema'].numpy().T.copy(),
      'bias': opt.state[model.linear.bias]['ema'].numpy().copy(),
      'scale': opt.state[model.norm.weight]['ema'].numpy().copy(),
    }
    steps.append(
      {
        'loss': loss.item(),
        'params': params_of(model),
        'perturbation': sub(w_adv, w),
        'ema': ema,
        'grad': g,
        'grad_adv': g_adv,
      }
    )
  return steps


VASSO_CASES = [
  ('defaults', {'rho': 0.05, 'theta': 0.9}),
  ('rho0.1_theta0.4', {'rho': 0.1, 'theta': 0.4}),
]


# ---------------------------------------------------------------------------------------------
# GCSAM: the script's two-step loop: loss.backward(); optimizer.first_step(zero_grad=True);
# criterion(model(data), target).backward(); optimizer.second_step(zero_grad=True).

GCSAM_LOOP = (
  'GCSAM(model.parameters(), torch.optim.SGD, **hyperparameters, lr=0.1, momentum=0.9) (the class '
  'builds the base optimizer itself from its kwargs); per step (the script): loss = '
  'criterion(model(x), y); loss.backward(); optimizer.first_step(zero_grad=True); '
  'criterion(model(x), y).backward(); optimizer.second_step(zero_grad=True).'
)


def load_gcsam(src: str | None):
  """Runs the official `centralized_gradient` and `GCSAM` definitions, verbatim.

  The official file is a training script (it downloads CIFAR-10 and imports TensorFlow at import
  time), so the two top-level definitions are taken out of it with `ast` and executed as they are
  in a namespace where `torch` is imported (as the script does before defining them).
  """
  text, meta = _external('gcsam', src)
  tree = ast.parse(text)
  wanted = {'centralized_gradient', 'GCSAM'}
  found = [n for n in tree.body if getattr(n, 'name', None) in wanted]
  if {n.name for n in found} != wanted:
    raise SystemExit('gcsam: centralized_gradient / GCSAM not found in the official file')
  ns = {'torch': torch, '__name__': 'gcsam_official'}
  segments = []
  for node in found:
    segment = ast.get_source_segment(text, node)
    segments.append(segment)
    exec(compile(segment, f'{SOURCES["gcsam"]["file"]}:{node.name}', 'exec'), ns)
  meta['executed'] = (
    'the top-level definitions centralized_gradient and GCSAM, source text unchanged '
    f'(sha256 of the two segments joined by a newline: {_sha256(chr(10).join(segments))})'
  )
  return ns['GCSAM'], meta


def run_gcsam(prob: Problem, hp: dict, gcsam_cls) -> list:
  model = prob.model()
  opt = gcsam_cls(
    model.parameters(), torch.optim.SGD, **hp, lr=BASE['lr'], momentum=BASE['momentum']
  )
  steps = []
  for _ in range(STEPS):
    w = params_of(model)
    loss = prob.loss(model)
    loss.backward()
    g = grads_of(model)
    opt.first_step(zero_grad=True)
    w_adv = params_of(model)
    prob.loss(model).backward()
    g_adv = grads_of(model)
    opt.second_step(zero_grad=True)
    steps.append(
      {
        'loss': loss.item(),
        'params': params_of(model),
        'perturbation': sub(w_adv, w),
        'grad': g,
        'grad_adv': g_adv,
      }
    )
  return steps


GCSAM_CASES = [
  ('defaults', {'rho': 0.05, 'adaptive': False}),
  ('adaptive', {'rho': 0.05, 'adaptive': True}),
  ('adaptive_rho0.5', {'rho': 0.5, 'adaptive': True}),
]


# ---------------------------------------------------------------------------------------------
# Unified SAM: README's manual form: optimizer.zero_grad(); loss.backward();
# optimizer.first_step(zero_grad=True); loss.backward(); optimizer.second_step().

UNIFIED_LOOP = (
  'unifiedSAM(model.parameters(), base_optimizer=torch.optim.SGD, **hyperparameters, lr=0.1, '
  'momentum=0.9); per step (README, manual form): optimizer.zero_grad(); criterion(model(x), '
  'y).backward(); optimizer.first_step(zero_grad=True); criterion(model(x), y).backward(); '
  "optimizer.second_step(). (The README's closure form calls step(closure), whose first_step "
  'reads p.grad before any closure ran: on the first iteration there is no gradient.)'
)


def run_unified(prob: Problem, hp: dict) -> list:
  from unifiedsam import unifiedSAM

  model = prob.model()
  opt = unifiedSAM(
    model.parameters(),
    base_optimizer=torch.optim.SGD,
    **hp,
    lr=BASE['lr'],
    momentum=BASE['momentum'],
  )
  steps = []
  for _ in range(STEPS):
    w = params_of(model)
    opt.zero_grad()
    loss = prob.loss(model)
    loss.backward()
    g = grads_of(model)
    opt.first_step(zero_grad=True)
    w_adv = params_of(model)
    prob.loss(model).backward()
    g_adv = grads_of(model)
    opt.second_step()
    steps.append(
      {
        'loss': loss.item(),
        'params': params_of(model),
        'perturbation': sub(w_adv, w),
        'number_steps': opt.number_steps,
        'grad': g,
        'grad_adv': g_adv,
      }
    )
  return steps


UNIFIED_CASES = [
  ('lambd1', {'rho': 0.1, 'lambd': 1.0}),
  ('lambd0.5', {'rho': 0.1, 'lambd': 0.5}),
  ('lambd0', {'rho': 0.1, 'lambd': 0.0}),
  ('lambd_1-1/t', {'rho': 0.1, 'lambd': '1-1/t'}),
  ('lambd_1/t', {'rho': 0.1, 'lambd': '1/t'}),
]


# ---------------------------------------------------------------------------------------------
# SAM-ON: train.py: batch_loss = criterion(model(x), y) (reduction='none');
# batch_loss.mean().backward(); minimizer.ascent_step(); criterion(model(x), y).mean().backward();
# minimizer.descent_step().

SAMON_LOOP = (
  'optimizer = torch.optim.SGD(model.parameters(), **base_optimizer); minimizer = '
  'cls(optimizer, model, **hyperparameters) with every keyword train.py passes; per step '
  '(train.py): criterion(model(x), y).mean().backward(); minimizer.ascent_step(); '
  'criterion(model(x), y).mean().backward(); minimizer.descent_step(). criterion = elementwise '
  'squared error here.'
)


def load_samon(src: str | None):
  text, meta = _external('sam_on', src)
  module = types.ModuleType('sam_on')
  module.__file__ = meta['loaded_from']
  exec(compile(text, SOURCES['sam_on']['file'], 'exec'), module.__dict__)
  meta['executed'] = 'the whole file, unchanged, as module sam_on'
  return module, meta


def run_samon(prob: Problem, cls_name: str, hp: dict, module) -> list:
  model = prob.model()
  optimizer = base_sgd(model.parameters())
  minimizer = getattr(module, cls_name)(optimizer, model, **hp)
  steps = []
  for _ in range(STEPS):
    w = params_of(model)
    loss = prob.loss_per_element(model).mean()
    loss.backward()
    g = grads_of(model)
    minimizer.ascent_step()
    w_adv = params_of(model)
    prob.loss_per_element(model).mean().backward()
    g_adv = grads_of(model)
    minimizer.descent_step()
    steps.append(
      {
        'loss': loss.item(),
        'params': params_of(model),
        'perturbation': sub(w_adv, w),
        'grad': g,
        'grad_adv': g_adv,
      }
    )
  return steps


def _samon_hp(**kw) -> dict:
  # train.py passes all of these; its argparse defaults are eta=0.0, p='2', flags False.
  hp = {
    'rho': 0.5,
    'eta': 0.0,
    'layerwise': False,
    'elementwise': False,
    'p': '2',
    'normalize_bias': False,
    'no_norm': False,
    'only_norm': False,
  }
  hp.update(kw)
  return hp


SAMON_CASES = [
  ('sam_only_norm', 'SAM_ON', _samon_hp(rho=0.5, only_norm=True)),
  ('sam_only_norm_rho0.05', 'SAM_ON', _samon_hp(rho=0.05, only_norm=True)),
  (
    'asam_only_norm',  # README command: --p=2 --elementwise --normalize_bias --only_norm
    'ASAM_ON',
    _samon_hp(rho=0.5, eta=0.0, elementwise=True, normalize_bias=True, only_norm=True),
  ),
  (
    'asam_only_norm_eta0.01',
    'ASAM_ON',
    _samon_hp(rho=0.5, eta=0.01, elementwise=True, normalize_bias=True, only_norm=True),
  ),
  ('sam_all', 'SAM_ON', _samon_hp(rho=0.05)),
  ('sam_no_norm', 'SAM_ON', _samon_hp(rho=0.05, no_norm=True)),
  ('asam_all_eta0.01', 'ASAM_ON', _samon_hp(rho=0.5, eta=0.01, elementwise=True)),
  (
    'asam_all_eta0.01_normalize_bias',
    'ASAM_ON',
    _samon_hp(rho=0.5, eta=0.01, elementwise=True, normalize_bias=True),
  ),
]


# ---------------------------------------------------------------------------------------------
# Lookbehind-SAM: example_cifar.py: per batch, for i in range(k): forward, backward,
# minimizer.ascent_step(); forward, backward, minimizer.descent_step().

LOOKBEHIND_LOOP = (
  'optimizer = torch.optim.SGD(model.parameters(), **base_optimizer); minimizer = cls(optimizer, '
  'model, rho=, eta=, k_steps=, alpha=) (alpha=-1: adaptive); one step = one batch of '
  'example_cifar.py: for i in range(k): criterion(model(x), y).mean().backward(); '
  'minimizer.ascent_step(); criterion(model(x), y).mean().backward(); minimizer.descent_step().'
)


def run_lookbehind(prob: Problem, cls_name: str, hp: dict) -> list:
  import lookbehind

  model = prob.model()
  optimizer = base_sgd(model.parameters())
  minimizer = getattr(lookbehind, cls_name)(optimizer, model, **hp)
  torch_params = {
    'kernel': model.linear.weight,
    'bias': model.linear.bias,
    'scale': model.norm.weight,
  }

  def fast():  # the official state's fast weights (cached_params), JAX orientation
    out = {k: minimizer.state[p]['cached_params'].numpy().copy() for k, p in torch_params.items()}
    out['kernel'] = out['kernel'].T.copy()
    return out

  steps = []
  for _ in range(STEPS):
    slow = params_of(model)
    inner = []
    for _ in range(hp['k_steps']):
      point = params_of(model)
      loss = prob.loss(model)
      loss.mean().backward()
      g = grads_of(model)
      minimizer.ascent_step()
      w_adv = params_of(model)
      prob.loss(model).mean().backward()
      g_adv = grads_of(model)
      minimizer.descent_step()
      inner.append(
        {
          'point': point,
          'loss': loss.item(),
          'grad': g,
          'perturbation': sub(w_adv, point),
          'grad_adv': g_adv,
          'fast_params_after': fast(),
        }
      )
    step = {'slow_before': slow, 'params': params_of(model), 'inner': inner}
    if hp['alpha'] == -1:  # recomputed here (numpy) for debugging; the official value is internal
      first, last = inner[0]['fast_params_after'], inner[-1]['fast_params_after']
      alphas = {}
      for k in slow:
        a, b = (first[k] - slow[k]).ravel(), (last[k] - slow[k]).ravel()
        cos = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8)
        alphas[k] = (cos + 1.0) / 2.0
      step['adaptive_alpha_recomputed'] = alphas
    steps.append(step)
  return steps


LOOKBEHIND_CASES = [
  ('sam_k2_alpha0.5', 'LookbehindSAM', {'rho': 0.05, 'eta': 0.0, 'k_steps': 2, 'alpha': 0.5}),
  ('sam_k3_alpha0.5', 'LookbehindSAM', {'rho': 0.05, 'eta': 0.0, 'k_steps': 3, 'alpha': 0.5}),
  ('sam_k2_adaptive', 'LookbehindSAM', {'rho': 0.05, 'eta': 0.0, 'k_steps': 2, 'alpha': -1}),
  ('sam_k3_adaptive', 'LookbehindSAM', {'rho': 0.05, 'eta': 0.0, 'k_steps': 3, 'alpha': -1}),
  ('asam_k2_adaptive', 'LookbehindASAM', {'rho': 0.5, 'eta': 0.0, 'k_steps': 2, 'alpha': -1}),
  ('asam_k3_alpha0.8_eta0.01', 'LookbehindASAM',
   {'rho': 0.5, 'eta': 0.01, 'k_steps': 3, 'alpha': 0.8}),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# SAMPa: the algorithm lives in train.py's run(args), a two-process Lightning Fabric loop (rank 0
# takes the gradient at the perturbed point, rank 1 the one at the auxiliary point; one
# all_reduce sums them). It runs here unmodified, imported from the official train.py and
# utility.py, in two threads with the stand-ins below for what it imports and does not need:
# Lightning Fabric (rank from the thread, all_reduce = a sum across the two threads), the dataset
# (our batches) and the model (TinyNet). Its loss is the official utility.smooth_crossentropy
# (label smoothing 0.1) on TinyNet's three outputs as logits.

SAMPA_LOOP = (
  "train.run(args) of the official train.py, unmodified, in two threads standing for Fabric's "
  'two ranks (all_reduce sums across them); get_dataset/get_model/lightning.fabric are stand-ins '
  "(our batches, TinyNet, no-op setup); args: epochs=1, lr=0.1, momentum=0.9 and the case's rho, "
  'og (lambda) and weight_decay. One epoch of SAMPA_BATCHES batches = the steps recorded.'
)
SAMPA_BATCHES = 5  # batch t: rows (3 t + i) % 16, i < 8, of x; labels argmax(y, 1)


def sampa_batches(prob: Problem) -> list:
  labels = np.argmax(prob.data['y'], axis=1)
  rows = [[(3 * t + i) % 16 for i in range(8)] for t in range(SAMPA_BATCHES)]
  return [(prob.x[r], torch.tensor(labels[r])) for r in rows], rows, labels


class _FakeFabric:
  """Lightning Fabric for two ranks played by two threads of this process."""

  local = None  # threading.local with .rank, set per thread
  barrier = None
  slots: list = [None, None]

  def __init__(self, **kwargs):
    self.global_rank = _FakeFabric.local.rank

  def launch(self):
    pass

  def setup_dataloaders(self, *loaders, **kwargs):
    return loaders

  def setup(self, model, optimizer):
    return model, optimizer

  def no_backward_sync(self, model, enabled=True):
    import contextlib  # noqa: PLC0415

    return contextlib.nullcontext()

  def backward(self, loss):
    loss.backward()

  def all_reduce(self, tensor, reduce_op='sum'):
    assert reduce_op == 'sum'
    _FakeFabric.slots[self.global_rank] = tensor.clone()
    _FakeFabric.barrier.wait()
    total = _FakeFabric.slots[0] + _FakeFabric.slots[1]
    _FakeFabric.barrier.wait()
    return total


def run_sampa(prob: Problem, hp: dict) -> list:
  import threading  # noqa: PLC0415

  batches, _, labels = sampa_batches(prob)
  whole = [(prob.x, torch.tensor(labels))]
  data = types.SimpleNamespace(train=batches, valid=whole, test=whole)
  _FakeFabric.local, _FakeFabric.barrier = threading.local(), threading.Barrier(2)
  fabric = types.ModuleType('lightning.fabric')
  fabric.Fabric, fabric.seed_everything = _FakeFabric, lambda seed: None
  recorded = []

  def get_model(args):
    return prob.model()

  def get_dataset(args):
    return data

  original_sgd = torch.optim.SGD

  class RecordingSGD(original_sgd):
    def __init__(self, params, **kwargs):
      super().__init__(params, **kwargs)
      if _FakeFabric.local.rank == 0:
        model_params = self.param_groups[0]['params']
        self.register_step_post_hook(
          lambda *_: recorded.append(
            {
              'params': {
                'kernel': model_params[0].detach().numpy().T.copy(),
                'bias': model_params[1].detach().numpy().copy(),
                'scale': model_params[2].detach().numpy().copy(),
              }
            }
          )
        )

  sys.modules['lightning'] = types.ModuleType('lightning')
  sys.modules['lightning.fabric'] = fabric
  sys.modules['get_dataset'] = types.SimpleNamespace(get_dataset=get_dataset)
  sys.modules['get_model'] = types.SimpleNamespace(get_model=get_model)
  sys.modules.pop('train', None)  # imported afresh for each case, binding this case's stand-ins
  import train  # noqa: PLC0415 - the official train.py, from the temporary folder on sys.path

  save = tempfile.mkdtemp(prefix='official-sampa-save-')
  args = argparse.Namespace(
    epochs=1, lr=BASE['lr'], momentum=BASE['momentum'], seed=42, save_path=save, **hp
  )
  errors = []

  def rank(r):
    _FakeFabric.local.rank = r
    try:
      train.run(args)
    except BaseException as err:  # noqa: BLE001 - reported below
      errors.append(err)
      _FakeFabric.barrier.abort()

  train.optim.SGD = RecordingSGD
  try:
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    train.optim.SGD = original_sgd
  if errors:
    raise errors[0]
  assert len(recorded) == SAMPA_BATCHES, len(recorded)
  return recorded


def sampa_header(prob: Problem) -> dict:
  """What differs for SAMPa: a classification loss, five batches, weight decay per case."""
  _, rows, labels = sampa_batches(prob)
  return {
    'problem': {
      **header(prob, 'sampa', {}, '', '')['problem'],
      'loss': (
        'utility.smooth_crossentropy(out, labels, smoothing=0.1).mean() (official): KL of the '
        'smoothed one-hot (0.9 on the label, 0.05 elsewhere) to softmax(out), over the batch'
      ),
      'labels': labels,
      'batches': rows,
      'batches_rule': 'batch t: rows (3 t + i) % 16, i < 8, of x and labels',
    },
    'base_optimizer': {
      'name': 'torch.optim.SGD',
      **BASE,
      'weight_decay': "the case's hyperparameters['weight_decay']",
    },
    'trajectory_fields': "steps[i]['params']: the parameters after step i + 1 (JAX orientation).",
  }


SAMPA_CASES = [
  ('defaults', {'rho': 0.1, 'og': 0.2, 'weight_decay': 0.0005}),
  ('rho0.5_og0.5_no_decay', {'rho': 0.5, 'og': 0.5, 'weight_decay': 0.0}),
  ('rho0.3_og0.8_decay0.01', {'rho': 0.3, 'og': 0.8, 'weight_decay': 0.01}),
]


# ---------------------------------------------------------------------------------------------


def header(prob: Problem, method: str, official: dict, cls: str, loop: str) -> dict:
  return {
    'method': method,
    'official': {**official, 'class': cls},
    'torch_version': torch.__version__,
    'numpy_version': np.__version__,
    'python_version': platform.python_version(),
    'dtype': 'float64 (torch.set_default_dtype(torch.float64))',
    'generated_by': 'tests/official/generate.py',
    'problem': {
      'model': 'out = tanh((x @ kernel + bias) * scale)',
      'loss': 'mean((out - y) ** 2) over all 16 * 3 entries',
      'data': (
        'rng = numpy.random.default_rng(0); x = rng.normal(size=(16, 5)); '
        'y = rng.normal(size=(16, 3)); kernel = 0.5 * rng.normal(size=(5, 3)); '
        'bias = full((3,), 0.1); scale = 1 + 0.1 * rng.normal(size=(3,))'
      ),
      'torch_parameters': {
        'kernel': 'linear.weight, shape (3, 5) = kernel.T',
        'bias': 'linear.bias',
        'scale': 'norm.weight',
      },
      'torch_parameter_order': ['linear.weight', 'linear.bias', 'norm.weight'],
      'x': prob.data['x'],
      'y': prob.data['y'],
      'init_params': prob.data['params'],
    },
    'base_optimizer': {'name': 'torch.optim.SGD', **BASE},
    'num_steps': STEPS,
    'training_loop': loop,
    'trajectory_fields': (
      "steps[i] is the state after step i + 1: 'params' (JAX orientation), 'loss' (at the "
      "parameters before the step), 'perturbation' (parameters at the second gradient evaluation "
      "minus parameters before the step, so exact to ~1e-16), 'grad' / 'grad_adv' (gradients at "
      'those two points, before the optimizer touches them).'
    ),
    'cases': [],
  }


def dumps(doc: dict) -> str:
  """Indented JSON with each innermost list of numbers on one line; floats as Python's repr."""
  text = json.dumps(to_json(doc), indent=1)
  return re.sub(r'\[([-+0-9.eE,\s]+)\]', lambda m: '[' + re.sub(r'\s+', '', m.group(1)) + ']', text)


def write(out: Path, name: str, doc: dict) -> None:
  path = out / f'{name}.json'
  path.write_text(dumps(doc) + '\n')
  print(f'wrote {path}: {len(doc["cases"])} cases: {", ".join(c["name"] for c in doc["cases"])}')


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=str(HERE), help='folder for the JSON files')
  parser.add_argument('--gcsam-src', default=None, help='Mohamed-Hassan22/GCSAM checkout or file')
  parser.add_argument('--samon-src', default=None, help='mueller-mp/SAM-ON checkout or file')
  parser.add_argument(
    '--only', nargs='*', default=None, choices=sorted(SOURCES), help='methods to regenerate'
  )
  args = parser.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  sys.dont_write_bytecode = True  # no __pycache__ next to the official files
  torch.set_default_dtype(torch.float64)
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  prob = Problem()
  methods = args.only or list(SOURCES)
  failed = []

  # method: (load() -> (official file's record, what its runner needs), class, loop, cases, run)
  vendored = lambda method: lambda: (_vendored(method), None)
  table = {
    'wsam': (
      vendored('wsam'),
      'WeightedSAM',
      WSAM_LOOP,
      WSAM_CASES,
      lambda _, hp: run_wsam(prob, hp),
    ),
    'vasso': (
      vendored('vasso'),
      'VASSO',
      VASSO_LOOP,
      VASSO_CASES,
      lambda _, hp: run_vasso(prob, hp),
    ),
    'gcsam': (
      lambda: load_gcsam(args.gcsam_src)[::-1],
      'GCSAM',
      GCSAM_LOOP,
      GCSAM_CASES,
      lambda cls, hp: run_gcsam(prob, hp, cls),
    ),
    'unified_sam': (
      vendored('unified_sam'),
      'unifiedSAM',
      UNIFIED_LOOP,
      UNIFIED_CASES,
      lambda _, hp: run_unified(prob, hp),
    ),
    'sam_on': (
      lambda: load_samon(args.samon_src)[::-1],
      'SAM_ON / ASAM_ON',
      SAMON_LOOP,
      SAMON_CASES,
      lambda module, cls_name, hp: run_samon(prob, cls_name, hp, module),
    ),
    'sampa': (
      vendored('sampa'),
      'train.run (the training loop)',
      SAMPA_LOOP,
      SAMPA_CASES,
      lambda _, hp: run_sampa(prob, hp),
    ),
    'lookbehind_sam': (
      vendored('lookbehind_sam'),
      'LookbehindSAM / LookbehindASAM',
      LOOKBEHIND_LOOP,
      LOOKBEHIND_CASES,
      lambda _, cls_name, hp: run_lookbehind(prob, cls_name, hp),
    ),
  }
  for method in SOURCES:
    if method not in methods:
      continue
    load, cls, loop, cases, run = table[method]
    try:
      meta, needed = load()
    except (FileNotFoundError, subprocess.CalledProcessError) as err:
      print(f'SKIPPED {method}: {err}')
      failed.append(method)
      continue
    doc = header(prob, method, meta, cls, loop)
    if method == 'sampa':
      doc |= sampa_header(prob)
    for name, *rest in cases:  # (name, hp) or (name, class name, hp)
      case = {'name': name, 'class': rest[0]} if len(rest) == 2 else {'name': name}
      doc['cases'].append(case | {'hyperparameters': rest[-1], 'steps': run(needed, *rest)})
    write(out, method, doc)

  if failed:
    print(f'not regenerated (official source not found): {", ".join(failed)}')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
