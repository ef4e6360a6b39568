"""Independent NumPy re-implementations of the official SAM-family algorithms.

Written from the official PyTorch code (davda54 SAM, SamsungLabs ASAM, nblt
F-SAM, cltan023 StableSAM usam.py, juntang-zhuang GSAM), step by step with a
PyTorch-style SGD with momentum as the base optimizer. Nothing here calls
optax_sam; only the loss's gradient comes from JAX.
"""

import numpy as np


def global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree.values())))


class ReferenceSAM:
  """One SAM-family optimizer over a dict of NumPy arrays.

  variant options: normalize, adaptive (T = |w| + eta on keys in scaled_keys),
  friendly (sigma, lmbda), stable, gsam (alpha).
  """

  def __init__(
    self,
    grad,
    lr=0.1,
    momentum=0.9,
    rho=0.05,
    normalize=True,
    adaptive=False,
    eta=0.0,
    scaled_keys=None,
    friendly=False,
    sigma=1.0,
    lmbda=0.9,
    stable=False,
    gsam_alpha=None,
    eps=1e-12,
  ):
    self.grad, self.lr, self.momentum, self.rho = grad, lr, momentum, rho
    self.normalize, self.adaptive, self.eta, self.scaled_keys = (
      normalize,
      adaptive,
      eta,
      scaled_keys,
    )
    self.friendly, self.sigma, self.lmbda = friendly, sigma, lmbda
    self.stable, self.gsam_alpha, self.eps = stable, gsam_alpha, eps
    self.ema = None
    self.buf = None

  def _t(self, w):
    if not self.adaptive:
      return {k: 1.0 for k in w}
    keys = w.keys() if self.scaled_keys is None else self.scaled_keys
    return {k: (np.abs(v) + self.eta if k in keys else 1.0) for k, v in w.items()}

  def step(self, w):
    g = self.grad(w)
    # F-SAM: d = g - sigma * m_prev, then m = lmbda * m_prev + (1 - lmbda) * g; first step m = g.
    if self.friendly:
      if self.ema is None:
        d, self.ema = dict(g), dict(g)
      else:
        d = {k: g[k] - self.sigma * self.ema[k] for k in g}
        self.ema = {k: self.ema[k] * self.lmbda + g[k] * (1 - self.lmbda) for k in g}
    else:
      d = g
    t = self._t(w)
    norm = global_norm({k: t[k] * d[k] for k in d})
    scale = self.rho / (norm + self.eps) if self.normalize else self.rho
    e = {k: (t[k] ** 2) * d[k] * scale for k in d}
    w_adv = {k: w[k] + e[k] for k in w}
    g_adv = self.grad(w_adv)
    if self.stable:
      t_adv = self._t(w_adv)
      clean = global_norm({k: t[k] * g[k] for k in g})
      adv = global_norm({k: t_adv[k] * g_adv[k] for k in g})
      g_adv = {k: g_adv[k] * clean / (adv + self.eps) for k in g}
    if self.gsam_alpha is not None:
      inner = sum(float(np.sum(g[k] * g_adv[k])) for k in g)
      coef = inner / (global_norm(g_adv) ** 2 + self.eps)
      g_adv = {k: g_adv[k] - self.gsam_alpha * (g[k] - coef * g_adv[k]) for k in g}
    # PyTorch SGD with momentum (dampening 0): buf = momentum * buf + g; w -= lr * buf.
    if self.buf is None:
      self.buf = dict(g_adv)
    else:
      self.buf = {k: self.momentum * self.buf[k] + g_adv[k] for k in g}
    return {k: w[k] - self.lr * self.buf[k] for k in w}
