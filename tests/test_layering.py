"""Import layering of ``dfkd_jax``, read from the source with ``ast`` (nothing is imported).

The rules are the tables below; a module may import only what they allow:

* ``LAYERS``: ranks, lowest first. A module imports only from its own rank or lower ones (rule ``upward``).
* ``BLOCK_ORDER``: inside the two lowest ranks, the packages in a fixed order. A package imports only
  packages listed before it (or itself), which also rules out cycles between them (rule ``block-order``).
  Modules of one package import each other freely.
* ``SIBLINGS_FORBIDDEN``: in these packages a module imports no other module of the same package
  (rule ``sideways``), except the ones in ``SHARED_SIBLINGS`` (every engine may import ``engines.common``).

Imports inside functions count as much as module-level ones, and ``from dfkd_jax.x import y`` counts as an
import of the module ``dfkd_jax.x.y`` when ``y`` is a module. Dynamic imports (``importlib``) are not seen.
"""
from __future__ import annotations

import ast
import os
from typing import Iterator, NamedTuple

import pytest

PACKAGE = 'dfkd_jax'

# Rank order, lowest first: (layer, module prefixes below dfkd_jax). The longest matching prefix decides,
# so ``convert.__main__`` is an entry point while the rest of ``convert`` is a building block.
LAYERS = (
    ('base', ('errors', 'configlib')),
    ('building block', ('models', 'data', 'losses', 'optim', 'synth', 'sr', 'convert')),
    ('run', ('run',)),
    ('engines', ('engines',)),
    ('methods', ('methods',)),
    ('entry', ('main', 'train', 'replay', 'compare', 'convert.__main__')),
)

# Packages of the two lowest layers, each importing only the ones before it.
BLOCK_ORDER = ('errors', 'configlib', 'data', 'models', 'losses', 'optim', 'synth', 'sr', 'convert')

# Packages whose modules are alternatives to each other: no module imports a sibling ...
SIBLINGS_FORBIDDEN = ('engines', 'methods')
# ... except these shared ones.
SHARED_SIBLINGS = ('engines.common',)

_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


class Import(NamedTuple):
  source: str  # module path below dfkd_jax, dotted ('' for the package itself)
  target: str
  path: str  # file, relative to the repository
  line: int


def _module_name(path: str) -> str:
  """'dfkd_jax/engines/common.py' -> 'engines.common'; a package's __init__ is the package."""
  parts = os.path.relpath(path, _ROOT)[:-len('.py')].split(os.sep)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _is_module(name: str) -> bool:
  base = os.path.join(_ROOT, *name.split('.')) if name else _ROOT
  return os.path.isfile(base + '.py') or os.path.isfile(os.path.join(base, '__init__.py'))


def _internal(name: str) -> str | None:
  """'dfkd_jax.run.loop' -> 'run.loop'; None for other top-level packages."""
  if name == PACKAGE:
    return ''
  return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + '.') else None


def _imports(path: str) -> Iterator[Import]:
  source = _module_name(path)
  is_package = path.endswith('__init__.py')
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  rel_path = os.path.relpath(path, os.path.dirname(_ROOT))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = _internal(alias.name)
        if target is not None:
          yield Import(source, target, rel_path, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        package = source.split('.') if is_package else source.split('.')[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = '.'.join(package + ([node.module] if node.module else [])).strip('.')
      else:
        base = _internal(node.module or '')
        if base is None:
          continue
      for alias in node.names:
        submodule = f'{base}.{alias.name}'.strip('.')
        yield Import(source, submodule if _is_module(submodule) else base, rel_path, node.lineno)


def _module_paths() -> list[str]:
  return sorted(os.path.join(directory, name) for directory, _, files in os.walk(_ROOT)
                for name in files if name.endswith('.py'))


def all_imports() -> list[Import]:
  return [imp for path in _module_paths() for imp in _imports(path)]


def _longest_prefix(module: str, prefixes) -> str | None:
  matches = [p for p in prefixes if module == p or module.startswith(p + '.')]
  return max(matches, key=len) if matches else None


def _layer_rank(module: str) -> int | None:
  """Rank in LAYERS; None for the package root (dfkd_jax/__init__.py: metadata only)."""
  every_prefix = [p for _, prefixes in LAYERS for p in prefixes]
  prefix = _longest_prefix(module, every_prefix)
  if prefix is None:
    return None
  return next(rank for rank, (_, prefixes) in enumerate(LAYERS) if prefix in prefixes)


def violations(imports: list[Import]) -> list[str]:
  found = []
  for imp in imports:
    where = f'{imp.path}:{imp.line}: {PACKAGE}.{imp.source} imports {PACKAGE}.{imp.target}'
    source_rank, target_rank = _layer_rank(imp.source), _layer_rank(imp.target)
    if source_rank is None or target_rank is None:
      continue
    if target_rank > source_rank:
      found.append(f'{where} [upward: {LAYERS[source_rank][0]} -> {LAYERS[target_rank][0]}]')
      continue
    source_block, target_block = (_longest_prefix(m, BLOCK_ORDER) for m in (imp.source, imp.target))
    if source_rank == target_rank and source_block and target_block and (
        BLOCK_ORDER.index(target_block) > BLOCK_ORDER.index(source_block)):
      found.append(f'{where} [block-order: {source_block} comes before {target_block} in BLOCK_ORDER]')
      continue
    package = _longest_prefix(imp.source, SIBLINGS_FORBIDDEN)
    if (package and imp.source != package and imp.target.startswith(package + '.') and imp.target != imp.source
        and imp.target not in SHARED_SIBLINGS):
      shared = ', '.join(m for m in SHARED_SIBLINGS if m.startswith(package + '.'))
      found.append(f'{where} [sideways: {package} modules import no sibling{" but " + shared if shared else ""}]')
  return found


def test_imports_follow_the_layering():
  imports = all_imports()
  assert len({imp.source for imp in imports}) > 30, 'the scan found too few modules: wrong root?'
  found = violations(imports)
  if found:
    pytest.fail('import layering violated (rules at the top of tests/test_layering.py):\n' + '\n'.join(found))


def test_every_module_has_a_layer():
  """A new top-level module or package must join LAYERS (and BLOCK_ORDER if it is a building block)."""
  modules = [_module_name(path) for path in _module_paths()]
  unplaced = [f'{PACKAGE}.{m}' for m in modules if m and _layer_rank(m) is None]
  assert not unplaced, f'modules in no layer of LAYERS: {unplaced}'
  blocks = [p for _, prefixes in LAYERS[:2] for p in prefixes]
  assert sorted(blocks) == sorted(BLOCK_ORDER), 'BLOCK_ORDER must list exactly the base and building-block packages'


def test_the_rules_catch_each_kind_of_violation():
  """The checker itself: one synthetic import per rule, and the allowed shapes pass."""
  def check(source, target):
    return violations([Import(source, target, 'x.py', 1)])

  assert 'upward' in check('models.layers', 'run.parallel')[0]
  assert 'upward' in check('engines.common', 'methods.dafl')[0]
  assert 'upward' in check('convert.api', 'convert.__main__')[0]
  assert 'block-order' in check('models.registry', 'convert.model_dir')[0]
  assert 'block-order' in check('errors', 'configlib')[0]
  assert 'sideways' in check('methods.dfsr', 'methods.sr_supervised')[0]
  assert 'sideways' in check('engines.inversion', 'engines.generative')[0]
  assert 'sideways' in check('engines.common', 'engines.selected_kd')[0]
  for allowed in (('run.parallel', 'models.layers'), ('convert.api', 'convert.teachers'),
                  ('convert.teachers', 'convert.api'), ('methods.pu', 'engines.selected_kd'),
                  ('engines.inversion', 'engines.common'), ('convert.__main__', 'convert.api'),
                  ('main', 'train'), ('convert.api', 'data.preprocess'), ('methods', 'errors')):
    assert not check(*allowed), allowed
