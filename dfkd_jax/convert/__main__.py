"""Command line of the converter (``python -m dfkd_jax.convert``, installed as ``dfkd-jax-convert``).

  python -m dfkd_jax.convert --source FILE.pth --out DIR [--arch NAME] [--num-classes N]
                             [--dataset NAME] [--model-kwargs k=v,...]
  python -m dfkd_jax.convert export --model DIR --out FILE.pth [--like REFERENCE.pth]

The first form (also spelled ``convert ...``) writes a converted-model directory; the second
writes a converted directory, or the final model of a training workdir, back as a torch state_dict.
User errors print one line, ``error: ...``, and exit with status 2 (``--verbose`` adds the
traceback). What was written is the one line on stdout. Library notes (Orbax logs dozens of lines
per model it writes) are logged only with ``--verbosity=0``.
"""
from __future__ import annotations

import argparse
import ast
import sys
import traceback

from absl import app, flags, logging

from dfkd_jax.convert import api
from dfkd_jax.errors import UserError

PROG = 'python -m dfkd_jax.convert'


def parse_model_kwargs(text: str) -> dict:
  """``'nz=512,img_size=32'`` -> ``{'nz': 512, 'img_size': 32}``; values are Python literals
  (ints, floats, True/False) or else strings."""
  kwargs = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, sep, value = item.partition('=')
    if not sep or not name.strip():
      raise UserError(f'--model-kwargs expects key=value[,key=value...], got {item!r}')
    try:
      kwargs[name.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      kwargs[name.strip()] = value.strip()
  return kwargs


def _convert_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, description='Convert a reference PyTorch checkpoint (a state_dict, a {"state_dict": ...} '
      'training checkpoint or a pickled nn.Module; zip or legacy torch.save) into a converted-model '
      'directory: an Orbax checkpoint of {params, batch_stats} plus metadata.json. torch is not needed '
      'and nothing in the file is executed.',
      epilog=f'Export back to a torch state_dict: {PROG} export --model DIR --out FILE.pth '
      f'(see {PROG} export --help).')
  parser.add_argument('--source', required=True, help='the .pth file')
  parser.add_argument('--out', required=True, help='output directory (absent or empty)')
  parser.add_argument('--arch', help='registry name (e.g. resnet34, wrn40_2, cmi_generator); '
                      'default: the one architecture the file fits')
  parser.add_argument('--num-classes', type=int, help='class count of a classifier; default: read from the file')
  parser.add_argument('--dataset', help='input normalisation the model was trained with (mnist, cifar10, '
                      'cifar100, cifar100_huawei, svhn, imagenet, tiny_imagenet, none); recorded in the metadata')
  parser.add_argument('--model-kwargs', default='', metavar='K=V,...',
                      help='builder keywords, e.g. nz=512,img_size=32 (sizes that appear as tensor dimensions, '
                      'such as nz, nc, ngf, are read from the file when not given)')
  return _common_options(parser)


def _export_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=f'{PROG} export', description='Write a converted-model directory (or the final model of a '
      'training workdir: WORKDIR/student, WORKDIR/model) as a PyTorch state_dict .pth in the reference '
      'naming; it loads with torch.load(FILE, weights_only=True) and load_state_dict(strict=True).')
  parser.add_argument('--model', required=True, help='converted-model directory or training workdir')
  parser.add_argument('--out', required=True, help='the .pth file to write (must not exist)')
  parser.add_argument('--like', metavar='REFERENCE.pth',
                      help='name and order the keys as in this checkpoint of the same architecture '
                      '(e.g. a Huawei conv1/fc1 LeNet, or a DataParallel module. prefix)')
  return _common_options(parser)


def _common_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument('--verbose', action='store_true', help='show tracebacks')
  parser.add_argument('--verbosity', type=int, default=logging.WARNING, metavar='N',
                      help='absl logging verbosity: -1 warnings (default), 0 adds the libraries\' notes')
  return parser


def _run_convert(args) -> str:
  meta = api.convert(args.source, args.out, arch=args.arch, num_classes=args.num_classes, dataset=args.dataset,
                     model_kwargs=parse_model_kwargs(args.model_kwargs))
  sizes = ', '.join(f'{k}={v}' for k, v in sorted(meta['model_kwargs'].items()))
  return (f"converted {args.source} (sha256 {meta['source']['sha256'][:12]}...) to {args.out}: {meta['arch']}"
          + (f", num_classes={meta['num_classes']}" if meta['num_classes'] is not None else '')
          + (f', {sizes}' if sizes else '') + f", dataset={meta['dataset']}")


def _run_export(args) -> str:
  meta = api.export(args.model, args.out, like=args.like)
  return f"exported {args.model} ({meta['arch']}) to {args.out}"


def main(argv: list[str] | None = None) -> int:
  """Runs the command ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ['export']:
    args, command = _export_parser().parse_args(argv[1:]), _run_export
  else:
    args, command = _convert_parser().parse_args(argv[1:] if argv[:1] == ['convert'] else argv), _run_convert
  logging.set_verbosity(args.verbosity)
  try:
    print(command(args))
  except UserError as e:
    if args.verbose:
      traceback.print_exc()
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  return 0


def run() -> None:
  """The ``dfkd-jax-convert`` console script: absl start-up (its log handler on stderr) around
  ``main``, which parses the arguments itself (argparse)."""
  app.run(lambda argv: main(argv[1:]), flags_parser=lambda argv: [*flags.FLAGS(argv[:1]), *argv[1:]])


if __name__ == '__main__':
  run()
