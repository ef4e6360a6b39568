"""Independent NumPy re-implementations of the cheaper SAM variants' reference code.

Written from MarlonBecker/MSAM (``optimizer/looksam.py``, ``optimizer/msam.py``,
``optimizer/adamW_msam.py``), step by step, over dicts of NumPy float64
arrays; the weight decay sits where the reference code puts it. Nothing here
calls optax_sam; ``grad(w)`` is any function of such a dict.
"""

import numpy as np

from tests.reference import global_norm


def _sgd(w, d_p, buf, lr, momentum, weight_decay):
  """The reference's functional SGD: L2 decay into the gradient, buffers from zeros."""
  d_p = {k: d_p[k] + weight_decay * w[k] for k in w}
  buf = {k: momentum * buf[k] + d_p[k] for k in w}
  return {k: w[k] - lr * buf[k] for k in w}, buf


class ReferenceLookSAM:
  """LookSAM (``looksam.py``): SAM every k steps, the stored direction reused in between."""

  def __init__(self, grad, w, lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.1, alpha=0.7, k=5):
    self.grad, self.lr, self.momentum, self.weight_decay = grad, lr, momentum, weight_decay
    self.rho, self.alpha, self.k = rho, alpha, k
    self.buf = {key: np.zeros_like(v) for key, v in w.items()}
    self.v = {key: np.zeros_like(v) for key, v in w.items()}
    self.counter = k  # the first step is a SAM step

  def step(self, w):
    g = self.grad(w)
    if self.counter == self.k:
      self.counter = 0
      scale = self.rho / (global_norm(g) + 1e-12)
      w_adv = {key: w[key] + scale * g[key] for key in w}
      g_adv = self.grad(w_adv)
      dot = sum(float(np.sum(g_adv[key] * g[key])) for key in g)
      coef = dot / (global_norm(g) ** 2 + 1e-12)
      v = {key: g_adv[key] - coef * g[key] for key in g}
      v_norm = global_norm(v)
      self.v = {key: v[key] / v_norm for key in v}  # no epsilon in the reference
      d_p = g_adv
    else:
      norm = global_norm(g)
      d_p = {key: g[key] + self.alpha * norm * self.v[key] for key in g}
    w, self.buf = _sgd(w, d_p, self.buf, self.lr, self.momentum, self.weight_decay)
    self.counter += 1
    return w


class ReferenceMSAM:
  """Momentum-SAM with SGD (``msam.py``); ``w`` is the held (perturbed) weights."""

  def __init__(self, grad, w, lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.3):
    self.grad, self.lr, self.momentum, self.weight_decay, self.rho = (
      grad,
      lr,
      momentum,
      weight_decay,
      rho,
    )
    self.buf = {key: np.zeros_like(v) for key, v in w.items()}
    self.inverse_norm = 0.0

  def step(self, w):
    g = self.grad(w)
    d_p = {key: g[key] + self.weight_decay * w[key] for key in w}  # decay at the held weights
    w = {key: w[key] + self.rho * self.inverse_norm * self.buf[key] for key in w}  # clean
    self.buf = {key: self.momentum * self.buf[key] + d_p[key] for key in w}
    w = {key: w[key] - self.lr * self.buf[key] for key in w}
    self.inverse_norm = 1 / (global_norm(self.buf) + 1e-12)
    return {key: w[key] - self.rho * self.inverse_norm * self.buf[key] for key in w}

  def clean(self, w):
    return {key: w[key] + self.rho * self.inverse_norm * self.buf[key] for key in w}


class ReferenceAdamWMSAM:
  """Momentum-SAM with AdamW (``adamW_msam.py``): decoupled decay after the Adam step."""

  def __init__(self, grad, w, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, rho=1.0):
    self.grad, self.lr, self.b1, self.b2, self.eps = grad, lr, b1, b2, eps
    self.weight_decay, self.rho = weight_decay, rho
    self.m = {key: np.zeros_like(v) for key, v in w.items()}
    self.v = {key: np.zeros_like(v) for key, v in w.items()}
    self.step_count = 0
    self.norm_factor = 0.0

  def step(self, w):
    g = self.grad(w)
    self.step_count += 1
    c1, c2 = 1 - self.b1**self.step_count, 1 - self.b2**self.step_count
    w = {key: w[key] + self.norm_factor * self.m[key] for key in w}  # clean
    self.m = {key: self.b1 * self.m[key] + (1 - self.b1) * g[key] for key in w}
    self.v = {key: self.b2 * self.v[key] + (1 - self.b2) * g[key] ** 2 for key in w}
    w = {
      key: w[key] - self.lr / c1 * self.m[key] / (np.sqrt(self.v[key]) / np.sqrt(c2) + self.eps)
      for key in w
    }
    w = {key: w[key] * (1 - self.lr * self.weight_decay) for key in w}
    self.norm_factor = self.rho / (global_norm(self.m) + 1e-12)
    return {key: w[key] - self.norm_factor * self.m[key] for key in w}

  def clean(self, w):
    return {key: w[key] + self.norm_factor * self.m[key] for key in w}
