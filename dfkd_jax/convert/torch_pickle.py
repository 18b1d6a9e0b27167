"""Reading and writing PyTorch checkpoint files without torch and without running code from them.

``torch.save`` writes one of two layouts:

* zip (the default since torch 1.6): an uncompressed zip archive whose entries share one top-level
  folder (torch names it after the file; readers take whatever the entries use). ``data.pkl`` is the
  pickled object, ``data/<key>`` the raw bytes of storage ``<key>``, ``byteorder`` ('little' or
  'big'; absent in older files, meaning little) and ``version`` the format version. In ``data.pkl`` a
  storage is the persistent id ``('storage', torch.<Type>Storage, key, location, numel)``.
* legacy (``_use_new_zipfile_serialization=False``, and every torch < 1.6): five consecutive pickles
  -- the magic number, protocol version 1001, a sys-info dict, the object, the list of storage keys --
  then, for each key in that list, the storage as an int64 element count and its raw bytes. Storage
  ids carry a sixth field (a view ``(view_key, offset, numel)`` or None), and the classes of pickled
  modules are the persistent ids ``('module', class, source_file, source)``.

A tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks
[, metadata])`` with offset and stride in elements, so views of one storage share it; a Parameter is
``_rebuild_parameter(tensor, requires_grad, hooks[, state])``. A pickled ``nn.Module`` (``torch.save(net)``)
is ``NEWOBJ(cls)`` + ``BUILD(__dict__)``: its tensors are in ``_parameters`` and ``_buffers`` and its
children in ``_modules``.

Safety: the unpickler imports nothing. It resolves only the globals in ``_SAFE_GLOBALS`` (our numpy
rebuilders of tensors, plain containers) and the storage types; every other global becomes an inert
stand-in class. Creating an instance of a stand-in the way pickled objects are rebuilt
(``cls.__new__`` then ``__dict__`` update) works, which is how modules such as ``lenet.LeNet5`` load;
calling one, which is how a payload such as ``os.system('...')`` runs, raises ``UnsafeCheckpointError``
before anything happens (``CheckpointFormatError`` for torch functions this reader does not implement,
such as the rebuilders of sparse or quantized tensors).
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping

import numpy as np

from dfkd_jax.errors import UserError

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001
# Wrapper entries that hold the weights of a training checkpoint, most specific first.
STATE_DICT_ENTRIES = ('state_dict', 'model_state_dict', 'model', 'net')
# Storage class name -> numpy type code of its elements ('bf16' is stored as its raw uint16 bits).
_STORAGE_ELEMENTS = {
    'DoubleStorage': 'f8', 'FloatStorage': 'f4', 'HalfStorage': 'f2', 'BFloat16Storage': 'bf16',
    'LongStorage': 'i8', 'IntStorage': 'i4', 'ShortStorage': 'i2', 'CharStorage': 'i1',
    'ByteStorage': 'u1', 'BoolStorage': 'b1', 'UntypedStorage': 'u1'}
_STORAGE_MODULES = ('torch', 'torch.cuda', 'torch.storage')
# Alignment of each record's data in archives we write (torch's own: lets torch.load(mmap=True) map them).
_RECORD_ALIGNMENT = 64


class CheckpointFormatError(UserError):
  """The file is missing, truncated, corrupted, or holds something other than weights we can read."""


class UnsafeCheckpointError(UserError):
  """The pickle calls a function a weights checkpoint never needs; nothing of it was run."""


class _Refused(Exception):
  """A stand-in for the global ``name`` was called."""

  def __init__(self, name: str):
    super().__init__(name)
    self.name = name


# --- storages and tensors ------------------------------------------------------------------------

class _StorageType:
  """What ``torch.<name>`` means in a pickle: the element type of a storage's bytes."""

  def __init__(self, name: str):
    self.name = name
    self.code = _STORAGE_ELEMENTS[name]

  def raw_dtype(self, byteorder: str) -> np.dtype:
    """dtype of the stored elements; ``byteorder`` is '<' or '>'."""
    return np.dtype(byteorder + ('u2' if self.code == 'bf16' else self.code))

  def to_native(self, elements: np.ndarray) -> np.ndarray:
    """A C-contiguous native-endian copy of ``elements``, bfloat16 widened exactly to float32."""
    native = np.array(elements, dtype=elements.dtype.newbyteorder('='), order='C')
    if self.code == 'bf16':
      return (native.astype(np.uint32) << 16).view(np.float32)
    return native


class _Storage:
  """``numel`` elements of ``storage_type`` whose bytes are read on first use.

  The format reader sets ``read`` (returns the bytes) and ``byteorder`` once it knows where the data is.
  """

  def __init__(self, key: str, storage_type: _StorageType, numel: int):
    self.key, self.storage_type, self.numel = key, storage_type, numel
    self.read: Callable[[], bytes] | None = None
    self.byteorder = '<'
    self._buffer: memoryview | None = None
    self._elements: np.ndarray | None = None

  def buffer(self) -> memoryview:
    if self._buffer is None:
      nbytes = self.numel * self.storage_type.raw_dtype('<').itemsize
      data = memoryview(self.read())
      if data.nbytes < nbytes:
        raise ValueError(f'storage {self.key} has {data.nbytes} bytes, expected {nbytes}')
      self._buffer = data[:nbytes]
    return self._buffer

  def elements(self) -> np.ndarray:
    if self._elements is None:
      self._elements = np.frombuffer(self.buffer(), self.storage_type.raw_dtype(self.byteorder))
    return self._elements


class _TensorRef:
  """A pickled tensor: ``shape`` elements at ``offset`` + sum(index * ``stride``) of ``storage``."""

  def __init__(self, storage, offset, shape, stride):
    if not isinstance(storage, _Storage):
      raise ValueError(f'a tensor is built on a {_describe(storage)}, not a storage')
    if not (_is_index(offset) and isinstance(shape, tuple) and isinstance(stride, tuple)
            and len(shape) == len(stride) and all(map(_is_index, shape + stride))):
      raise ValueError(f'bad tensor geometry: offset {offset!r}, size {shape!r}, stride {stride!r}')
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

  def to_numpy(self) -> np.ndarray:
    elements = self.storage.elements()
    if math.prod(self.shape) == 0:
      view = elements[:0].reshape(self.shape)
    else:
      last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
      if last >= elements.size:
        raise ValueError(f'a tensor reaches element {last} of storage {self.storage.key}, '
                         f'which has {elements.size}')
      view = np.lib.stride_tricks.as_strided(
          elements[self.offset:], self.shape, [s * elements.itemsize for s in self.stride],
          writeable=False)
    return self.storage.storage_type.to_native(view)


def _is_index(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage, storage_offset, size, stride, *requires_grad_hooks_metadata):
  """``torch._utils._rebuild_tensor`` and ``_rebuild_tensor_v2``; autograd fields are irrelevant here."""
  return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *requires_grad_hooks_state):
  """``torch._utils._rebuild_parameter`` and ``_rebuild_parameter_with_state``: the tensor itself."""
  if not isinstance(data, _TensorRef):
    raise ValueError(f'a Parameter wraps a {_describe(data)}, not a tensor')
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """``torch._tensor._rebuild_from_type_v2`` (tensors with Python attributes): the plain tensor."""
  if func is not _rebuild_tensor and not isinstance(func, _StandInMeta):
    raise ValueError(f'a tensor subclass is rebuilt by {_describe(func)}')
  return func(*args)


# --- inert stand-ins for everything else ---------------------------------------------------------

class _StandInMeta(type):
  """Metaclass of the stand-ins: calling a stand-in class (how REDUCE runs a payload) is refused."""

  def __call__(cls, *args, **kwargs):
    raise _Refused(cls.global_name)


class _StandIn(metaclass=_StandInMeta):
  """Inert object of a pickled class that is never imported, e.g. ``torch.nn.modules.conv.Conv2d``
  or a user's ``lenet.LeNet5``: NEWOBJ creates it with ``cls.__new__`` and BUILD fills ``__dict__``."""
  global_name = ''

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
      for part in state:
        if isinstance(part, dict):
          self.__dict__.update(part)
    elif isinstance(state, dict):
      self.__dict__.update(state)


class _Opaque:
  """A harmless value a checkpoint may carry next to its weights (a numpy scalar metric, a
  torch.device) that loading never looks at; its constructor arguments and state are dropped."""

  def __init__(self, global_name: str):
    self.global_name = global_name

  def __setstate__(self, state):
    pass


def _opaque(global_name: str) -> Callable[..., _Opaque]:
  return lambda *args: _Opaque(global_name)


def _latin1_bytes(text, encoding='latin1'):
  """``_codecs.encode``, which protocol-2 pickles use for ``bytes``; latin-1 only."""
  if not isinstance(text, str) or encoding != 'latin1':
    raise ValueError('_codecs.encode is only used with latin1 text')
  return text.encode('latin1')


# The only globals resolved to something callable: our own numpy rebuilders, builtin containers and
# inert placeholders. None runs code from the file or imports the module it is named after.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset, ('builtins', 'list'): list,
    ('builtins', 'dict'): dict, ('builtins', 'tuple'): tuple,
    ('_codecs', 'encode'): _latin1_bytes,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch.tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Size'): tuple,
    ('torch', 'device'): _opaque('torch.device'),
    **{(module, name): _opaque(f'{module}.{name}')
       for module in ('numpy.core.multiarray', 'numpy._core.multiarray')
       for name in ('scalar', '_reconstruct')},
    ('numpy', 'dtype'): _opaque('numpy.dtype'),
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a checkpoint, resolving globals only as the module docstring says.

  ``storages`` maps each storage key to its ``_Storage`` (legacy views are kept apart, in ``views``).
  """

  def __init__(self, file):
    super().__init__(file, encoding='utf-8')
    self.storages: dict[str, _Storage] = {}
    self.views: dict[str, _Storage] = {}
    self._stand_ins: dict[tuple[str, str], type] = {}

  def find_class(self, module, name):
    # Protocol-2 pickles name some globals as Python 2 did (``__builtin__.set``, ``commands.Popen``).
    module, name = _compat_pickle.NAME_MAPPING.get(
        (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[module, name]
    if module in _STORAGE_MODULES and name in _STORAGE_ELEMENTS:
      return _StorageType(name)
    if (module, name) not in self._stand_ins:
      self._stand_ins[module, name] = _StandInMeta(
          str(name), (_StandIn,), {'global_name': f'{module}.{name}', '__module__': str(module)})
    return self._stand_ins[module, name]

  def persistent_load(self, pid):
    kind = _ascii(pid[0]) if isinstance(pid, tuple) and pid else None
    if kind == 'module' and len(pid) == 4:  # legacy: a module class with its source, which we ignore
      return pid[1]
    if kind != 'storage' or len(pid) not in (5, 6):
      raise ValueError(f'unknown persistent id {str(pid)[:80]}')
    storage_type, key, _location, numel = pid[1:5]
    key = _ascii(key)
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f'storage type {_describe(storage_type)} is not supported')
    if not isinstance(key, str) or not _is_index(numel):
      raise ValueError(f'bad storage id {str(pid)[:80]}')
    storage = self.storages.setdefault(key, _Storage(key, storage_type, numel))
    if storage.storage_type.name != storage_type.name or storage.numel != numel:
      raise ValueError(f'storage {key} is declared with two types or sizes')
    view = pid[5] if len(pid) == 6 else None
    return storage if view is None else self._view(storage, view)

  def _view(self, root: _Storage, view) -> _Storage:
    """A legacy storage view ``(view_key, offset, numel)`` in elements of ``root``."""
    view_key, offset, numel = view
    view_key = _ascii(view_key)
    if view_key not in self.views:
      if not (_is_index(offset) and _is_index(numel) and offset + numel <= root.numel):
        raise ValueError(f'bad storage view {view!r} of a storage of {root.numel} elements')
      itemsize = root.storage_type.raw_dtype('<').itemsize
      storage = _Storage(view_key, root.storage_type, numel)
      storage.read = lambda: root.buffer()[offset * itemsize:(offset + numel) * itemsize]
      self.views[view_key] = storage
    return self.views[view_key]


def _ascii(value):
  """Python 2 pickles hold some internal strings as bytes."""
  return value.decode('ascii') if isinstance(value, bytes) else value


def _describe(value) -> str:
  if isinstance(value, _StandInMeta):
    return value.global_name
  if isinstance(value, _StandIn):  # the class's name: BUILD may have set any instance attribute
    return type(value).global_name + ' object'
  if isinstance(value, _Opaque):
    return value.global_name + ' value'
  return type(value).__name__


# --- the two file layouts ------------------------------------------------------------------------

def _unpickle_zip(file, path: str):
  """The object of a zip checkpoint; its storages read lazily from the archive."""
  try:
    archive = zipfile.ZipFile(file)
  except zipfile.BadZipFile as e:
    raise CheckpointFormatError(f'{path} is truncated or corrupted (not a readable zip archive: {e})') from e
  names = archive.namelist()
  if any(name.endswith('/constants.pkl') for name in names):
    raise CheckpointFormatError(f'{path} is a TorchScript archive (torch.jit.save); save the model\'s '
                                'state_dict() with torch.save instead')
  pickles = [name for name in names if name.endswith('/data.pkl') and name.count('/') == 1]
  if not pickles:
    raise CheckpointFormatError(f'{path} is a zip archive but not a torch.save file (it has no data.pkl)')
  folder = pickles[0][:-len('data.pkl')]
  byteorder = archive.read(folder + 'byteorder').decode() if folder + 'byteorder' in names else 'little'
  if byteorder not in ('little', 'big'):
    raise ValueError(f'unknown byteorder record {byteorder!r}')
  unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])))
  checkpoint = unpickler.load()
  for key, storage in unpickler.storages.items():
    storage.read = lambda name=f'{folder}data/{key}': archive.read(name)
    storage.byteorder = '<' if byteorder == 'little' else '>'
  return checkpoint


def _unpickle_legacy(file, path: str):
  """The object of a legacy checkpoint; its storages read lazily from ``file``."""
  if _RestrictedUnpickler(file).load() != LEGACY_MAGIC_NUMBER:
    raise CheckpointFormatError(f'{path} is a pickle but not a torch.save file (no torch magic number)')
  protocol = _RestrictedUnpickler(file).load()
  if protocol != LEGACY_PROTOCOL_VERSION:
    raise CheckpointFormatError(f'{path} uses legacy torch.save protocol {protocol!r}; only '
                                f'{LEGACY_PROTOCOL_VERSION} is supported')
  sys_info = _RestrictedUnpickler(file).load()
  if not (isinstance(sys_info, dict) and sys_info.get('little_endian', True)):
    raise CheckpointFormatError(f'{path} was saved on a big-endian machine, which is not supported')
  unpickler = _RestrictedUnpickler(file)
  checkpoint = unpickler.load()
  keys = _RestrictedUnpickler(file).load()
  if not isinstance(keys, list) or set(map(_ascii, keys)) != set(unpickler.storages):
    raise ValueError('the list of storage keys does not match the storages of the pickle')
  # Each storage: int64 element count, then the elements.
  offset, file_size = file.tell(), os.fstat(file.fileno()).st_size
  for key in map(_ascii, keys):
    storage = unpickler.storages[key]
    file.seek(offset)
    header = file.read(8)
    nbytes = storage.numel * storage.storage_type.raw_dtype('<').itemsize
    if len(header) < 8 or offset + 8 + nbytes > file_size:
      raise ValueError(f'the file ends inside storage {key}')
    if struct.unpack('<q', header)[0] != storage.numel:
      raise ValueError(f'storage {key} has a size header that does not match its pickled size')
    storage.read = lambda start=offset + 8, nbytes=nbytes: _read_at(file, start, nbytes)
    offset += 8 + nbytes
  return checkpoint


def _read_at(file, start: int, nbytes: int) -> bytes:
  file.seek(start)
  return file.read(nbytes)


# --- from the unpickled object to a state_dict ---------------------------------------------------

def _is_module(value) -> bool:
  return (isinstance(value, _StandIn) and isinstance(vars(value).get('_modules'), dict)
          and isinstance(vars(value).get('_parameters'), dict))


def _is_state_dict(value) -> bool:
  return isinstance(value, dict) and all(
      isinstance(key, str) and isinstance(tensor, _TensorRef) for key, tensor in value.items())


def _module_state_dict(module, prefix: str, out: dict, ancestors: tuple = ()) -> dict:
  """What ``module.state_dict()`` returns, by torch's rules: parameters, then persistent buffers,
  then each child's entries under ``<child>.``, skipping None entries."""
  if any(module is ancestor for ancestor in ancestors):
    raise ValueError(f'module {prefix or "<root>"} contains itself')
  attributes = vars(module)
  non_persistent = attributes.get('_non_persistent_buffers_set') or set()
  buffers = {name: buffer for name, buffer in (attributes.get('_buffers') or {}).items()
             if name not in non_persistent}
  for name, tensor in [*attributes['_parameters'].items(), *buffers.items()]:
    if tensor is not None:
      if not isinstance(tensor, _TensorRef):
        raise ValueError(f'{prefix}{name} of a {_describe(module)} is a {_describe(tensor)}, not a tensor')
      out[prefix + name] = tensor
  for name, child in attributes['_modules'].items():
    if child is not None:
      if not _is_module(child):
        raise ValueError(f'submodule {prefix}{name} is a {_describe(child)}, not a module')
      _module_state_dict(child, f'{prefix}{name}.', out, ancestors + (module,))
  return out


def _find_state_dict(checkpoint, path: str) -> dict[str, _TensorRef]:
  if _is_module(checkpoint):
    return _module_state_dict(checkpoint, '', {})
  if _is_state_dict(checkpoint):
    return dict(checkpoint)
  if isinstance(checkpoint, dict):
    for entry in STATE_DICT_ENTRIES:
      inner = checkpoint.get(entry)
      if _is_module(inner) or _is_state_dict(inner):
        return _find_state_dict(inner, path)
    keys = ', '.join(map(repr, list(checkpoint)[:10]))
    raise CheckpointFormatError(
        f'{path} holds a dict with keys {keys}, which is neither a state_dict (all values tensors) nor '
        f'a checkpoint with its weights under one of {", ".join(STATE_DICT_ENTRIES)}')
  raise CheckpointFormatError(f'{path} holds a {_describe(checkpoint)}, not a state_dict, a '
                              'checkpoint dict with a state_dict, or a pickled nn.Module')


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The weights in a ``torch.save`` file, as ``{key: array}`` in stored order, without torch.

  Accepts either layout (zip or legacy), and as content a state_dict, a training checkpoint dict
  with the weights under one of ``STATE_DICT_ENTRIES`` (other entries such as the optimizer are
  ignored), or a whole pickled ``nn.Module`` (``torch.save(net)``), whose keys are those of
  ``net.state_dict()`` -- with a ``module.`` prefix for ``DataParallel``, which callers strip.
  Arrays are C-contiguous copies in the tensor's dtype, except bfloat16, which becomes float32.

  Raises ``UnsafeCheckpointError`` if the pickle calls anything but tensor and container
  constructors (nothing from the file runs), and ``CheckpointFormatError`` for unreadable files.
  """
  path = os.fspath(path)
  try:
    file = open(path, 'rb')
  except OSError as e:
    raise CheckpointFormatError(f'cannot read {path}: {e.strerror or e}') from e
  with file:
    try:
      head = file.read(4)
      file.seek(0)
      if head.startswith(b'PK\x03\x04') or head.startswith(b'PK\x05\x06'):
        checkpoint = _unpickle_zip(file, path)
      elif head.startswith(b'\x80'):
        checkpoint = _unpickle_legacy(file, path)
      elif not head:
        raise CheckpointFormatError(f'{path} is empty')
      else:
        raise CheckpointFormatError(f'{path} is not a PyTorch checkpoint (neither a torch.save zip '
                                    'archive nor a legacy torch.save file)')
      return {key: tensor.to_numpy() for key, tensor in _find_state_dict(checkpoint, path).items()}
    except UserError:
      raise
    except _Refused as refused:
      if refused.name.startswith('torch.'):  # e.g. sparse or quantized tensors
        raise CheckpointFormatError(f'cannot load {path}: it calls {refused.name}, which this reader does '
                                    'not support (it rebuilds dense tensors, containers and pickled '
                                    'modules; nothing from the file was run)') from None
      raise UnsafeCheckpointError(f'refusing to load {path}: it calls {refused.name}, which a weights '
                                  'checkpoint never needs (nothing from the file was run)') from None
    except Exception as e:  # any failure to parse untrusted bytes means a damaged file
      raise CheckpointFormatError(f'{path} is truncated or corrupted ({_one_line(e)})') from e


# --- writing -------------------------------------------------------------------------------------

def _storage_name(dtype: np.dtype) -> str | None:
  if dtype.name == 'bfloat16':  # ml_dtypes.bfloat16, as jax uses
    return 'BFloat16Storage'
  for name, code in _STORAGE_ELEMENTS.items():
    if code != 'bf16' and name != 'UntypedStorage' and np.dtype(code) == dtype.newbyteorder('<'):
      return name
  return None


def _pickled_int(value: int) -> bytes:
  if 0 <= value < 256:
    return pickle.BININT1 + bytes([value])
  if -2**31 <= value < 2**31:
    return pickle.BININT + struct.pack('<i', value)
  encoded = value.to_bytes(value.bit_length() // 8 + 1, 'little', signed=True)
  return pickle.LONG1 + bytes([len(encoded)]) + encoded


def _pickled_str(text: str) -> bytes:
  encoded = text.encode('utf-8')
  return pickle.BINUNICODE + struct.pack('<I', len(encoded)) + encoded


def _pickled_global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f'{module}\n{name}\n'.encode('ascii')


def _pickled_tuple(items: list[bytes]) -> bytes:
  return pickle.MARK + b''.join(items) + pickle.TUPLE if items else pickle.EMPTY_TUPLE


def _state_dict_pickle(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
  """``data.pkl`` for ``(key, storage class name, shape)`` entries whose storages are ``data/<index>``.

  It is what ``torch.save(OrderedDict)`` pickles, without memo opcodes: protocol 2,
  ``OrderedDict()`` filled by SETITEMS with
  ``_rebuild_tensor_v2(<('storage', torch.<Type>Storage, '<index>', 'cpu', numel)>, 0, shape,
  C-contiguous strides, False, OrderedDict())``. Written opcode by opcode because ``pickle.Pickler``
  would import torch to check the globals it names.
  """
  new_ordered_dict = _pickled_global('collections', 'OrderedDict') + pickle.EMPTY_TUPLE + pickle.REDUCE
  out = [pickle.PROTO + bytes([2]), new_ordered_dict]
  if entries:
    out.append(pickle.MARK)
    for index, (key, storage_name, shape) in enumerate(entries):
      strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
      storage_id = _pickled_tuple([_pickled_str('storage'), _pickled_global('torch', storage_name),
                                   _pickled_str(str(index)), _pickled_str('cpu'),
                                   _pickled_int(math.prod(shape))])
      arguments = _pickled_tuple([storage_id + pickle.BINPERSID, _pickled_int(0),
                                  _pickled_tuple([_pickled_int(n) for n in shape]),
                                  _pickled_tuple([_pickled_int(s) for s in strides]),
                                  pickle.NEWFALSE, new_ordered_dict])
      out += [_pickled_str(key), _pickled_global('torch._utils', '_rebuild_tensor_v2'), arguments,
              pickle.REDUCE]
    out.append(pickle.SETITEMS)
  out.append(pickle.STOP)
  return b''.join(out)


def _write_aligned_record(archive: zipfile.ZipFile, file, name: str, data) -> None:
  """Stores ``data`` uncompressed with its first byte at a multiple of ``_RECORD_ALIGNMENT``.

  The local header is 30 bytes + name + extra fields: ours pads (id 'FB', as torch's writer), and
  ``force_zip64`` makes zipfile always append its 20-byte zip64 field, so the length is known.
  """
  info = zipfile.ZipInfo(name)
  header_end = file.tell() + 30 + len(name.encode('utf-8')) + 4 + 20
  padding = -header_end % _RECORD_ALIGNMENT
  info.extra = b'FB' + struct.pack('<H', padding) + b'Z' * padding
  with archive.open(info, 'w', force_zip64=True) as record:
    record.write(data)


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes ``state_dict`` as ``torch.save(OrderedDict(state_dict), path)`` would, without torch.

  The result is a zip-layout file (see the module docstring) that ``torch.load(path,
  weights_only=True)`` reads as an ``OrderedDict`` of CPU tensors equal to the arrays. Choices:
  folder ``archive/``; records ``data.pkl``, ``.format_version`` (1), ``.storage_alignment`` (64),
  ``byteorder`` (little), ``data/<i>`` for the i-th entry, ``version`` (3); each tensor gets its
  own C-contiguous little-endian storage (shared or strided numpy views are copied out), stored
  uncompressed and 64-byte aligned. Supported dtypes: float64/32/16, bfloat16 (ml_dtypes), int64/32/
  16/8, uint8, bool. The file is written next to ``path`` and renamed over it when complete.
  """
  path = os.fspath(path)
  entries, blobs = [], []
  for key, value in state_dict.items():
    array = np.asarray(value)
    storage_name = _storage_name(array.dtype)
    if not isinstance(key, str) or storage_name is None:
      raise UserError(f'cannot save entry {key!r} to {path}: keys must be strings and dtypes one of '
                      f'float64/32/16, bfloat16, int64/32/16/8, uint8, bool (got {array.dtype})')
    raw = array.view(np.uint16) if storage_name == 'BFloat16Storage' else array
    blobs.append(np.ascontiguousarray(raw, raw.dtype.newbyteorder('<')))
    entries.append((key, storage_name, array.shape))
  partial_path = path + '.partial'
  try:
    with open(partial_path, 'wb') as file, zipfile.ZipFile(file, 'w', zipfile.ZIP_STORED) as archive:
      records = [('data.pkl', _state_dict_pickle(entries)), ('.format_version', b'1'),
                 ('.storage_alignment', str(_RECORD_ALIGNMENT).encode()), ('byteorder', b'little'),
                 *((f'data/{index}', blob.reshape(-1).view(np.uint8)) for index, blob in enumerate(blobs)),
                 ('version', b'3\n')]
      for name, data in records:
        _write_aligned_record(archive, file, 'archive/' + name, data)
    os.replace(partial_path, path)
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror or e}') from e
  finally:
    if os.path.exists(partial_path):
      os.remove(partial_path)
