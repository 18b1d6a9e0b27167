"""Import PyTorch teachers exactly (and export students back), without torch.

Inside the package the imports go one way: ``torch_pickle``, ``naming`` <- ``model_dir`` <-
``identify`` (which architecture a file holds) <- ``api`` (convert, export) <- ``teachers`` (the
one teacher loader) <- ``__main__`` (the command line, ``python -m dfkd_jax.convert --help``).
"""
from dfkd_jax.convert.api import convert, export
from dfkd_jax.convert.teachers import load_teacher

__all__ = ['convert', 'export', 'load_teacher']
