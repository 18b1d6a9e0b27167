"""Import PyTorch teachers exactly (and export students back), without torch.

``load_teacher(path)`` gives ``(model, variables)`` for a ``.pth`` file or a converted-model
directory; ``python -m dfkd_jax.convert --help`` converts and exports files (see ``api``).
"""
from dfkd_jax.convert.api import convert, export, load_teacher

__all__ = ['convert', 'export', 'load_teacher']
