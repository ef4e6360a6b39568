r"""A character-level transformer language model: AdamW, SAM and Functional-SAM side by side.

Run from a clone (``pip install -e '.[examples]'``)::

  python -m optax_sam.examples.language_model                  # the default run (about 25 min)
  python -m optax_sam.examples.language_model --quick          # a tiny run that checks the script
  python -m optax_sam.examples.language_model --steps 4000 --width 128 --layers 4   # larger

The corpus is CPython's own documentation text, ``pydoc_data.topics`` (the reference
manual's topics, about 465,000 characters on Python 3.11; no download), as ASCII characters, the
last 10 % held out for validation. The model is a pre-LayerNorm decoder-only transformer written
with Flax NNX (learned positions, GELU MLPs, causal self-attention). Four optimizers train the
same initial weights on the same batches (paired seeds, all seeds side by side under
``jax.vmap``):

* ``adamw``: ``optax.adamw`` with a warmup-cosine schedule;
* ``sam``: ``optax_sam.sam(adamw, rho)``;
* ``functional_sam``: the same optimizer with Functional-SAM's ``grad_fn``
  (:func:`optax_sam.functional_value_and_grad`: the Jacobian at ``w + e``, the output gradient
  at ``w``);
* ``precond_functional_sam``: :func:`optax_sam.preconditioned_sam` (the ascent in AdamW's
  geometry) with Functional-SAM's ``grad_fn``.

It reports, per optimizer, the validation loss and perplexity (mean and spread over seeds, and
paired differences against AdamW), the time per step against AdamW's, the top Hessian eigenvalue
of the validation loss at the end, and the share of SAM's gradient change that goes through the
logit path (:func:`optax_sam.sharpness.sam_gradient_paths`). Writes ``language_model.json`` and
``language_model.md`` into ``--out``.

References:
  Singh et al., 2025, "Avoiding spurious sharpness minimization broadens applicability of SAM":
  https://arxiv.org/abs/2502.02407
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_sam

OPTIMIZERS = ('adamw', 'sam', 'functional_sam', 'precond_functional_sam')
VALIDATION_FRACTION = 0.1
VALIDATION_BATCHES = 8  # fixed validation windows: VALIDATION_BATCHES x batch_size
LANCZOS_STEPS = 20


@dataclasses.dataclass(frozen=True)
class Setting:
  """What every run shares.

  Attributes:
    steps: optimizer steps.
    batch_size: windows per step.
    context: characters per window.
    width: the model's width (embedding size); the MLP is 4x wider.
    layers: transformer blocks.
    heads: attention heads.
    lr: AdamW's peak learning rate (linear warmup over 5 % of the steps, cosine to 0).
    weight_decay: AdamW's decoupled weight decay.
    rho: the SAM radius of the three SAM optimizers.
    seeds: the paired seeds (initial weights and batches).
    eval_every: steps between validation evaluations (and progress lines).
    optimizers: which of :data:`OPTIMIZERS` to train.
  """

  steps: int = 1500
  batch_size: int = 32
  context: int = 64
  width: int = 64
  layers: int = 2
  heads: int = 4
  lr: float = 3e-3
  weight_decay: float = 0.1
  rho: float = 0.05
  seeds: tuple = (0, 1, 2)
  eval_every: int = 250
  optimizers: tuple = OPTIMIZERS


QUICK = Setting(steps=20, batch_size=4, context=16, width=16, layers=1, heads=2, eval_every=10,
                seeds=(0, 1))  # fmt: skip


# --- Data --------------------------------------------------------------------------------------


def load_corpus() -> tuple[np.ndarray, np.ndarray, list[str]]:
  """CPython's documentation topics as ASCII codes: ``(train, validation, vocabulary)``.

  Characters outside printable ASCII (and newline) become ``?``; the vocabulary is the sorted
  set of characters that remain.
  """
  import pydoc_data.topics  # noqa: PLC0415 - ships with CPython

  text = '\n\n'.join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
  text = ''.join(c if (c == '\n' or 32 <= ord(c) < 127) else '?' for c in text)
  vocabulary = sorted(set(text))
  index = {c: i for i, c in enumerate(vocabulary)}
  codes = np.array([index[c] for c in text], np.int32)
  split = int(len(codes) * (1 - VALIDATION_FRACTION))
  return codes[:split], codes[split:], vocabulary


def windows(codes: jax.Array, starts: jax.Array, context: int) -> tuple[jax.Array, jax.Array]:
  """Inputs ``codes[s : s + context]`` and targets shifted by one, for each start ``s``."""
  take = lambda s: jax.lax.dynamic_slice(codes, (s,), (context + 1,))
  chunk = jax.vmap(take)(starts)
  return chunk[:, :-1], chunk[:, 1:]


def random_batch(codes: jax.Array, key: jax.Array, setting: Setting):
  starts = jax.random.randint(key, (setting.batch_size,), 0, len(codes) - setting.context - 1)
  return windows(codes, starts, setting.context)


# --- Model -------------------------------------------------------------------------------------


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=heads, in_features=width, decode=False, keep_rngs=False, rngs=rngs
    )
    self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), mask=mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class CharTransformer(nnx.Module):
  """Decoder-only transformer over characters: logits ``[batch, context, vocabulary]``."""

  def __init__(self, vocabulary: int, setting: Setting, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocabulary, setting.width, rngs=rngs)
    self.positions = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (setting.context, setting.width))
    )
    self.blocks = nnx.List(
      [Block(setting.width, setting.heads, rngs) for _ in range(setting.layers)]
    )
    self.final_norm = nnx.LayerNorm(setting.width, rngs=rngs)
    self.head = nnx.Linear(setting.width, vocabulary, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.positions[...][: tokens.shape[-1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.final_norm(x))


def model_functions(vocabulary: int, setting: Setting):
  """``(init(key) -> params, apply(params, tokens) -> logits)``, pure functions of the NNX model."""
  abstract = nnx.eval_shape(lambda: CharTransformer(vocabulary, setting, nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)

  def init(key):
    return nnx.as_pure(nnx.state(CharTransformer(vocabulary, setting, nnx.Rngs(key))))

  def apply(params, tokens):
    return nnx.merge(graphdef, params)(tokens)

  return init, apply


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# --- Optimizers and steps ----------------------------------------------------------------------


def make_optimizer(name: str, setting: Setting) -> optax.GradientTransformation:
  """AdamW with warmup and cosine decay, or one of the SAM optimizers around it."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, setting.lr, max(1, setting.steps // 20), setting.steps
  )
  adamw = optax.adamw(schedule, weight_decay=setting.weight_decay)
  if name == 'adamw':
    return adamw
  if name == 'precond_functional_sam':
    return optax_sam.preconditioned_sam(adamw, setting.rho)
  if name in ('sam', 'functional_sam'):
    return optax_sam.sam(adamw, setting.rho)
  raise ValueError(f'unknown optimizer {name!r}; choose from {", ".join(OPTIMIZERS)}')


def make_step(name: str, tx, apply: Callable, setting: Setting):
  """``step(params, state, batch) -> (params, state, loss)`` for optimizer ``name``."""

  def step(params, state, batch):
    tokens, targets = batch
    if name in ('functional_sam', 'precond_functional_sam'):
      loss, grads, grad_fn = optax_sam.functional_value_and_grad(
        lambda p: apply(p, tokens), lambda logits: cross_entropy(logits, targets), params
      )
    else:
      loss_of = lambda p: cross_entropy(apply(p, tokens), targets)
      loss, grads = jax.value_and_grad(loss_of)(params)
      grad_fn = jax.grad(loss_of)
    extra = {} if name == 'adamw' else {'grad_fn': grad_fn}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  return step


# --- Training ----------------------------------------------------------------------------------


def train_one(name: str, setting: Setting, data: dict, log: Callable[[str], None]) -> dict:
  """Trains optimizer ``name`` on every seed at once; returns its curves, timing and measures."""
  init, apply = data['functions']
  tx = make_optimizer(name, setting)
  step = make_step(name, tx, apply, setting)
  train_codes, validation_batches = data['train'], data['validation_batches']

  def chunk(params, state, key, start):
    def body(carry, i):
      params, state = carry
      batch = random_batch(train_codes, jax.random.fold_in(key, start + i), setting)
      params, state, loss = step(params, state, batch)
      return (params, state), loss

    (params, state), losses = jax.lax.scan(body, (params, state), jnp.arange(setting.eval_every))
    return params, state, losses.mean()

  def validation_loss(params):
    losses = jax.vmap(lambda b: cross_entropy(apply(params, b[0]), b[1]))(validation_batches)
    return losses.mean()

  keys = jnp.stack([jax.random.key(s) for s in setting.seeds])
  params = jax.vmap(init)(keys)
  state = jax.vmap(tx.init)(params)
  run_chunk = jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None)))
  evaluate = jax.jit(jax.vmap(validation_loss))
  curve, seconds, start = [], [], 0
  data_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)  # the batches, per seed
  while start < setting.steps:
    begin = time.perf_counter()
    params, state, train_loss = run_chunk(params, state, data_keys, start)
    jax.block_until_ready(params)
    seconds.append(time.perf_counter() - begin)
    start += setting.eval_every
    validation = np.asarray(evaluate(params))
    curve.append(dict(step=start, train_loss=np.asarray(train_loss).tolist(),
                      validation_loss=validation.tolist()))  # fmt: skip
    log(f'  {name:24s} step {start:5d}/{setting.steps}  train {float(np.mean(train_loss)):.4f}  '
        f'validation {float(np.mean(validation)):.4f}  ({seconds[-1]:.1f} s)')  # fmt: skip
  timed = seconds[1:] or seconds  # the first chunk includes compiling
  return dict(
    name=name,
    curve=curve,
    final_validation_loss=curve[-1]['validation_loss'],
    seconds_per_step=float(np.median(timed)) / setting.eval_every,
    compile_and_first_chunk_s=seconds[0],
    measures=final_measures(
      params, apply, jax.tree.map(lambda a: a[0], validation_batches), setting
    ),
  )


def final_measures(params, apply: Callable, batch, setting: Setting) -> dict:
  """Per seed: the validation loss's top Hessian eigenvalue and SAM's gradient paths at ``rho``."""
  tokens, targets = batch
  loss_fn = lambda p, b: cross_entropy(apply(p, b[0]), b[1])

  def one(p, key):
    top = optax_sam.sharpness.hessian_eigenvalues(
      loss_fn, p, batch, key=key, k=1, num_steps=LANCZOS_STEPS
    )
    paths = optax_sam.sharpness.sam_gradient_paths(
      lambda q: apply(q, tokens), lambda logits: cross_entropy(logits, targets), p, setting.rho
    )
    return top.eigenvalues[0], top.residuals[0], paths.logit_share

  keys = jax.random.split(jax.random.key(7), len(setting.seeds))
  top, residual, share = jax.jit(jax.vmap(one))(params, keys)
  return dict(
    top_eigenvalue=np.asarray(top).tolist(),
    eigenvalue_residual=np.asarray(residual).tolist(),
    logit_path_share=np.asarray(share).tolist(),
  )


# --- Report ------------------------------------------------------------------------------------


def _spread(values: Sequence[float]) -> list[float]:
  """``[mean, standard deviation]`` (0 for one value)."""
  values = np.asarray(values, np.float64)
  return [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]


def _mean_std(values: Sequence[float]) -> str:
  mean, std = _spread(values)
  return f'{mean:.4f} ± {std:.4f}'


def summarize(runs: list[dict]) -> list[dict]:
  """Per optimizer: validation loss, perplexity, paired difference to AdamW, cost, measures."""
  by_name = {r['name']: r for r in runs}
  reference = by_name.get('adamw')
  rows = []
  for r in runs:
    loss = np.asarray(r['final_validation_loss'])
    row = dict(
      name=r['name'],
      validation_loss=_spread(loss),
      perplexity=_spread(np.exp(loss)),
      seconds_per_step=r['seconds_per_step'],
      top_eigenvalue=r['measures']['top_eigenvalue'],
      logit_path_share=r['measures']['logit_path_share'],
    )
    if reference is not None:
      diff = loss - np.asarray(reference['final_validation_loss'])
      row['minus_adamw'] = [*_spread(diff), int(np.sum(diff < 0))]
      row['cost_vs_adamw'] = r['seconds_per_step'] / reference['seconds_per_step']
    rows.append(row)
  return rows


def verdict(row: dict) -> str:
  mean, spread, _ = row['minus_adamw']
  if abs(mean) <= spread:
    return 'no difference'
  return 'lower' if mean < 0 else 'higher'


def render_markdown(document: dict) -> str:
  setting = document['setting']
  lines = [
    '# Character-level language model: AdamW, SAM, Functional-SAM',
    '',
    f'Written by `{document["command"]}` ({document["date"]}, {document["device"]}). '
    f'Corpus: `pydoc_data.topics` ({document["corpus"]["train_characters"]:,} training and '
    f'{document["corpus"]["validation_characters"]:,} validation characters, '
    f'{document["corpus"]["vocabulary"]} symbols). Setting: '
    + ', '.join(f'{k}={v}' for k, v in setting.items() if k != 'optimizers')
    + '. Mean ± standard deviation over the seeds; differences are paired per seed.',
    '',
    '| optimizer | validation loss | perplexity | − AdamW (paired; seeds lower) '
    "| time / step vs AdamW | top Hessian eigenvalue | logit-path share of SAM's change |",
    '|---|---|---|---|---|---|---|',
  ]
  for row in document['summary']:
    diff = '-'
    if 'minus_adamw' in row and row['name'] != 'adamw':
      m, s, k = row['minus_adamw']
      diff = f'{m:+.4f} ± {s:.4f} ({k}/{len(setting["seeds"])}; {verdict(row)})'
    cost = f'{row["cost_vs_adamw"]:.2f}' if 'cost_vs_adamw' in row else '-'
    lines.append(
      f'| {row["name"]} | {row["validation_loss"][0]:.4f} ± {row["validation_loss"][1]:.4f} | '
      f'{row["perplexity"][0]:.3f} ± {row["perplexity"][1]:.3f} | {diff} | {cost} | '
      f'{_mean_std(row["top_eigenvalue"])} | {_mean_std(row["logit_path_share"])} |'
    )
  return '\n'.join(lines) + '\n'


# --- Command line ------------------------------------------------------------------------------

INTEGERS = ('steps', 'batch_size', 'context', 'width', 'layers', 'heads', 'eval_every')
FLOATS = ('lr', 'weight_decay', 'rho')


def _flag(name: str) -> str:
  return '--' + name.replace('_', '-')


def build_parser() -> argparse.ArgumentParser:
  default = Setting()
  p = argparse.ArgumentParser(
    prog='python -m optax_sam.examples.language_model', description=__doc__.split('\n')[0]
  )
  p.add_argument('--quick', action='store_true', help='a tiny run that checks the script')
  for name in INTEGERS + FLOATS:
    kind = int if name in INTEGERS else float
    p.add_argument(_flag(name), type=kind, help=f'default {getattr(default, name)}')
  p.add_argument('--seeds', type=int, help=f'seeds 0..N-1 (default {len(default.seeds)})')
  p.add_argument('--optimizers', help=f'comma-separated, from {",".join(OPTIMIZERS)} (default all)')
  p.add_argument('--out', type=pathlib.Path, default=pathlib.Path('language_model_results'),
                 help='folder for language_model.json and language_model.md')  # fmt: skip
  return p


def setting_from(args: argparse.Namespace) -> Setting:
  setting = QUICK if args.quick else Setting()
  changes: dict[str, Any] = {}
  for name in INTEGERS + FLOATS:
    if getattr(args, name) is not None:
      changes[name] = getattr(args, name)
  if args.seeds is not None:
    changes['seeds'] = tuple(range(args.seeds))
  if args.optimizers:
    changes['optimizers'] = tuple(x.strip() for x in args.optimizers.split(',') if x.strip())
  setting = dataclasses.replace(setting, **changes)
  unknown = [o for o in setting.optimizers if o not in OPTIMIZERS]
  if unknown:
    raise ValueError(f'unknown optimizer {unknown[0]!r}; choose from {", ".join(OPTIMIZERS)}')
  for name in INTEGERS:
    if getattr(setting, name) < 1:
      raise ValueError(f'{_flag(name)} must be at least 1, got {getattr(setting, name)}')
  if setting.width % setting.heads:
    raise ValueError(f'--width {setting.width} must be a multiple of --heads {setting.heads}')
  if setting.steps % setting.eval_every:
    raise ValueError(
      f'--steps {setting.steps} must be a multiple of --eval-every {setting.eval_every}'
    )
  if len(setting.seeds) < 1 or setting.rho < 0 or setting.lr <= 0:
    raise ValueError('need at least one seed, --rho >= 0 and --lr > 0')
  return setting


def run(setting: Setting, out: pathlib.Path, argv: Sequence[str], log=print) -> dict:
  """Trains every optimizer of ``setting`` and writes the JSON and the markdown into ``out``."""
  train_codes, validation_codes, vocabulary = load_corpus()
  if len(validation_codes) <= setting.context + 1:
    raise ValueError(f'--context {setting.context} is longer than the validation text')
  starts = np.linspace(0, len(validation_codes) - setting.context - 2,
                       VALIDATION_BATCHES * setting.batch_size).astype(np.int32)  # fmt: skip
  tokens, targets = windows(jnp.asarray(validation_codes), jnp.asarray(starts), setting.context)
  shape = (VALIDATION_BATCHES, setting.batch_size, setting.context)
  data = dict(
    functions=model_functions(len(vocabulary), setting),
    train=jnp.asarray(train_codes),
    validation_batches=(tokens.reshape(shape), targets.reshape(shape)),
  )
  log(
    f'corpus: {len(train_codes):,} training and {len(validation_codes):,} validation '
    f'characters, {len(vocabulary)} symbols; seeds {list(setting.seeds)}; '
    f'{jax.devices()[0].device_kind}'
  )
  runs = [train_one(name, setting, data, log) for name in setting.optimizers]
  document = dict(
    command='python -m optax_sam.examples.language_model ' + ' '.join(argv),
    date=time.strftime('%Y-%m-%d', time.gmtime()),
    device=f'{jax.devices()[0].device_kind} ({jax.default_backend()})',
    versions=dict(python=sys.version.split()[0], jax=jax.__version__, optax=optax.__version__),
    corpus=dict(
      train_characters=len(train_codes),
      validation_characters=len(validation_codes),
      vocabulary=len(vocabulary),
    ),  # fmt: skip
    setting=dataclasses.asdict(setting),
    runs=runs,
  )
  document['summary'] = summarize(runs)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'language_model.json').write_text(json.dumps(document, indent=1))
  markdown = render_markdown(document)
  (out / 'language_model.md').write_text(markdown)
  log(markdown)
  return document


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  try:
    setting = setting_from(args)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  run(setting, args.out, argv)
  return 0


if __name__ == '__main__':
  sys.exit(main())
