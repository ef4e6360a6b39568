"""A small residual CNN in Flax NNX for 1-D signals (MNIST-1D) and 2-D images (digits, CIFAR-10)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ResidualBlock(nnx.Module):
  """Two 3-wide convolutions with BatchNorm and a (projected when needed) shortcut.

  Args:
    in_channels: channels of the input.
    out_channels: channels of the output.
    stride: stride of the first convolution (2 halves the length).
    ndim: number of spatial dimensions (1 for signals, 2 for images).
    rngs: the parameter initialization keys.
  """

  def __init__(
    self, in_channels: int, out_channels: int, stride: int, ndim: int, *, rngs: nnx.Rngs
  ):
    kernel, strides = (3,) * ndim, (stride,) * ndim
    conv = dict(padding='SAME', use_bias=False, rngs=rngs)
    self.conv1 = nnx.Conv(in_channels, out_channels, kernel, strides=strides, **conv)
    self.norm1 = nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(out_channels, out_channels, kernel, **conv)
    # The last normalization of the residual branch starts at zero, so each block starts
    # as the identity (Goyal et al., 2017).
    self.norm2 = nnx.BatchNorm(
      out_channels, momentum=0.9, scale_init=nnx.initializers.zeros_init(), rngs=rngs
    )
    if stride != 1 or in_channels != out_channels:
      self.shortcut = nnx.Sequential(
        nnx.Conv(in_channels, out_channels, (1,) * ndim, strides=strides, **conv),
        nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs),
      )
    else:
      self.shortcut = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    shortcut = x if self.shortcut is None else self.shortcut(x)
    return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
  """A residual CNN: a stem convolution, one block per stage, global pooling, dropout, a classifier.

  Every stage after the first halves the length (or the image size) and
  widens the channels. Inputs are ``(batch, *spatial, channels)``.

  Args:
    num_classes: number of output logits.
    in_channels: channels of the input (1 for MNIST-1D and digits, 3 for CIFAR-10).
    ndim: number of spatial dimensions of the input (1 or 2).
    widths: channels of each stage.
    dropout: dropout rate before the classifier.
    rngs: ``nnx.Rngs`` with a ``params`` stream and a ``dropout`` stream.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from optax_sam.examples import models
    >>> model = models.ResNet(10, in_channels=1, ndim=1, widths=(8, 16), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 40, 1))).shape
    (4, 10)
  """

  def __init__(
    self,
    num_classes: int,
    *,
    in_channels: int,
    ndim: int,
    widths: Sequence[int] = (32, 64, 128),
    dropout: float = 0.1,
    rngs: nnx.Rngs,
  ):
    self.stem = nnx.Conv(
      in_channels, widths[0], (3,) * ndim, padding='SAME', use_bias=False, rngs=rngs
    )
    self.stem_norm = nnx.BatchNorm(widths[0], momentum=0.9, rngs=rngs)
    blocks = []
    for i, width in enumerate(widths):
      in_width = widths[max(i - 1, 0)]
      blocks.append(ResidualBlock(in_width, width, 1 if i == 0 else 2, ndim, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))  # global average pooling
    return self.head(self.dropout(x))
