"""Small benchmark models in plain JAX: an MLP, a residual 1-D CNN and a CIFAR-style ResNet-18.

Each model is a :class:`Model`: ``init(key)`` returns ``(params, model_state)``
and ``loss(params, model_state, batch)`` returns ``(loss, new_model_state)``,
the form ``jax.value_and_grad(..., has_aux=True)`` takes. ``model_state`` holds
BatchNorm running statistics (empty for models without BatchNorm); the loss
normalizes with the batch's own statistics (training mode) and returns the
updated running averages as its side output. Parameters follow Flax's names
(``kernel``, ``bias``, ``scale``) so that ASAM's default mask (every leaf but
``bias``) means the same as in a Flax model.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
Batch = tuple[jax.Array, jax.Array]

_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5


class Model(NamedTuple):
  """A benchmark model and a synthetic batch for it.

  Attributes:
    name: short name used in tables.
    description: what the model is, with its sizes.
    init: ``init(key) -> (params, model_state)``.
    loss: ``loss(params, model_state, batch) -> (loss, new_model_state)``.
    batch: ``batch(key) -> (inputs, labels)``, synthetic data.
    batch_size: examples per batch.
  """

  name: str
  description: str
  init: Callable[[jax.Array], tuple[Params, Any]]
  loss: Callable[[Params, Any, Batch], tuple[jax.Array, Any]]
  batch: Callable[[jax.Array], Batch]
  batch_size: int


def _he_normal(key, shape, fan_in):
  return jax.random.normal(key, shape, jnp.float32) * np.sqrt(2.0 / fan_in)


def _dense_init(key, n_in, n_out):
  return {'kernel': _he_normal(key, (n_in, n_out), n_in), 'bias': jnp.zeros((n_out,))}


def _dense(p, x):
  return x @ p['kernel'] + p['bias']


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _classification_batch(input_shape, batch_size, num_classes=10):
  def batch(key):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch_size, *input_shape), jnp.float32)
    y = jax.random.randint(ky, (batch_size,), 0, num_classes)
    return x, y

  return batch


def mlp(width: int = 512, depth: int = 2, in_dim: int = 784, batch_size: int = 128) -> Model:
  """A ReLU MLP on flat inputs (MNIST-sized by default) with 10 classes."""
  sizes = [in_dim] + [width] * depth + [10]

  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    params = {
      f'dense_{i}': _dense_init(k, a, b)
      for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }
    return params, {}

  def loss(params, model_state, batch):
    x, y = batch
    for i in range(len(sizes) - 2):
      x = jax.nn.relu(_dense(params[f'dense_{i}'], x))
    logits = _dense(params[f'dense_{len(sizes) - 2}'], x)
    return _cross_entropy(logits, y), model_state

  return Model(
    name=f'mlp-w{width}',
    description=f'MLP {"-".join(map(str, sizes))}, ReLU',
    init=init,
    loss=loss,
    batch=_classification_batch((in_dim,), batch_size),
    batch_size=batch_size,
  )


def _conv1d_init(key, kernel_size, c_in, c_out):
  kernel = _he_normal(key, (kernel_size, c_in, c_out), kernel_size * c_in)
  return {'kernel': kernel, 'bias': jnp.zeros((c_out,))}


def _conv1d(p, x):
  y = jax.lax.conv_general_dilated(
    x, p['kernel'], window_strides=(1,), padding='SAME', dimension_numbers=('NWC', 'WIO', 'NWC')
  )
  return y + p['bias']


def cnn1d(channels: int = 64, blocks: int = 3, length: int = 40, batch_size: int = 128) -> Model:
  """A residual 1-D CNN for MNIST-1D-shaped inputs (length 40, one channel, 10 classes).

  A convolution stem, ``blocks`` residual blocks of two 3-tap convolutions with
  ReLU, global average pooling and a dense classifier.
  """

  def init(key):
    keys = jax.random.split(key, 2 * blocks + 2)
    params = {'stem': _conv1d_init(keys[0], 5, 1, channels)}
    for b in range(blocks):
      params[f'block_{b}'] = {
        'conv_0': _conv1d_init(keys[2 * b + 1], 3, channels, channels),
        'conv_1': _conv1d_init(keys[2 * b + 2], 3, channels, channels),
      }
    params['head'] = _dense_init(keys[-1], channels, 10)
    return params, {}

  def loss(params, model_state, batch):
    x, y = batch
    h = jax.nn.relu(_conv1d(params['stem'], x))
    for b in range(blocks):
      p = params[f'block_{b}']
      h = h + _conv1d(p['conv_1'], jax.nn.relu(_conv1d(p['conv_0'], h)))
      h = jax.nn.relu(h)
    logits = _dense(params['head'], h.mean(axis=1))
    return _cross_entropy(logits, y), model_state

  return Model(
    name=f'cnn1d-c{channels}',
    description=f'residual 1-D CNN, {channels} channels, {blocks} blocks, input 40x1',
    init=init,
    loss=loss,
    batch=_classification_batch((length, 1), batch_size),
    batch_size=batch_size,
  )


def _conv2d_init(key, kernel_size, c_in, c_out):
  shape = (kernel_size, kernel_size, c_in, c_out)
  return {'kernel': _he_normal(key, shape, kernel_size * kernel_size * c_in)}


def _conv2d(p, x, stride):
  return jax.lax.conv_general_dilated(
    x,
    p['kernel'],
    window_strides=(stride, stride),
    padding='SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


def _bn_init(c):
  return {'scale': jnp.ones((c,)), 'bias': jnp.zeros((c,))}, {
    'mean': jnp.zeros((c,)),
    'var': jnp.ones((c,)),
  }


def _batch_norm(p, stats, x):
  """Training-mode BatchNorm: normalizes with the batch's statistics, updates the running ones."""
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  y = (x - mean) * jax.lax.rsqrt(var + _BN_EPS) * p['scale'] + p['bias']
  new_stats = {
    'mean': _BN_MOMENTUM * stats['mean'] + (1 - _BN_MOMENTUM) * mean,
    'var': _BN_MOMENTUM * stats['var'] + (1 - _BN_MOMENTUM) * var,
  }
  return y, new_stats


_RESNET18_STAGES = ((1, 1), (2, 2), (4, 2), (8, 2))  # (width multiplier, stride), 2 blocks each


def resnet18(width: int = 64, image_size: int = 32, batch_size: int = 16) -> Model:
  """ResNet-18 for 32x32x3 images (CIFAR variant: 3x3 stem, no max-pool), 10 classes.

  BasicBlocks with BatchNorm, stages of ``width * (1, 2, 4, 8)`` channels, a
  1x1 projection shortcut where the shape changes; 11.2M parameters at
  ``width=64``.
  """

  def init(key):
    keys = iter(jax.random.split(key, 64))
    params, state = {}, {}
    params['stem'] = {'conv': _conv2d_init(next(keys), 3, 3, width)}
    params['stem']['bn'], state['stem'] = _bn_init(width)
    c_in = width
    for s, (mult, stride) in enumerate(_RESNET18_STAGES):
      c_out = width * mult
      for b in range(2):
        name = f'stage_{s}_block_{b}'
        first_stride = stride if b == 0 else 1
        p, st = {}, {}
        p['conv_0'] = _conv2d_init(next(keys), 3, c_in, c_out)
        p['bn_0'], st['bn_0'] = _bn_init(c_out)
        p['conv_1'] = _conv2d_init(next(keys), 3, c_out, c_out)
        p['bn_1'], st['bn_1'] = _bn_init(c_out)
        if first_stride != 1 or c_in != c_out:
          p['proj'] = _conv2d_init(next(keys), 1, c_in, c_out)
          p['bn_proj'], st['bn_proj'] = _bn_init(c_out)
        params[name], state[name] = p, st
        c_in = c_out
    params['head'] = _dense_init(next(keys), c_in, 10)
    return params, state

  def loss(params, model_state, batch):
    x, y = batch
    new_state = {}
    h, new_state['stem'] = _batch_norm(
      params['stem']['bn'], model_state['stem'], _conv2d(params['stem']['conv'], x, 1)
    )
    h = jax.nn.relu(h)
    for s, (_, stride) in enumerate(_RESNET18_STAGES):
      for b in range(2):
        name = f'stage_{s}_block_{b}'
        p, st, new = params[name], model_state[name], {}
        first_stride = stride if b == 0 else 1
        out, new['bn_0'] = _batch_norm(p['bn_0'], st['bn_0'], _conv2d(p['conv_0'], h, first_stride))
        out = jax.nn.relu(out)
        out, new['bn_1'] = _batch_norm(p['bn_1'], st['bn_1'], _conv2d(p['conv_1'], out, 1))
        if 'proj' in p:
          h, new['bn_proj'] = _batch_norm(
            p['bn_proj'], st['bn_proj'], _conv2d(p['proj'], h, first_stride)
          )
        h = jax.nn.relu(out + h)
        new_state[name] = new
    logits = _dense(params['head'], h.mean(axis=(1, 2)))
    return _cross_entropy(logits, y), new_state

  return Model(
    name='resnet18' if width == 64 else f'resnet18-w{width}',
    description=f'ResNet-18 (CIFAR stem, BatchNorm, width {width}), '
    f'input {image_size}x{image_size}x3',
    init=init,
    loss=loss,
    batch=_classification_batch((image_size, image_size, 3), batch_size),
    batch_size=batch_size,
  )


def param_count(params: Params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def param_bytes(params: Params) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
