"""The Flax NNX training example of optax_sam, laid out like Flax's own examples.

* :mod:`~optax_sam.examples.main`: the command line
  (``python -m optax_sam.examples.main --help``; ``python -m optax_sam.examples.train``
  is the same command);
* :mod:`~optax_sam.examples.config`: the options, their defaults and the optimizer names;
* :mod:`~optax_sam.examples.data`: MNIST-1D (generated offline and cached), digits, CIFAR-10;
* :mod:`~optax_sam.examples.models`: a small residual CNN with BatchNorm and dropout;
* :mod:`~optax_sam.examples.train`: the model, the optimizer, the steps and the training loop;
* :mod:`~optax_sam.examples.checkpoints`: the Orbax checkpoints and the checks of ``--resume``;
* :mod:`~optax_sam.examples.reporting`: the metrics file, the plots and the table.
"""
