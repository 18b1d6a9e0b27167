"""Small PyTorch classifiers written for the tests from the reference structures described in
reference_semantics.md §3.2 and the fixtures' notes (module names as the references' state_dicts).

They stand in for the reference classes of the architectures that have no stored fixture; every
``forward`` returns ``(logits, penultimate features)``.
"""
from torch import nn
from torch.nn import functional as F


def _conv_bn(cin, cout, kernel, stride=1, groups=1):
  return [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class _Residual(nn.Module):
  """BasicBlock (two 3x3) or Bottleneck (1x1, 3x3, 1x1 x4); stride on the 3x3 conv; projection
  ``Sequential(conv1x1, BN)`` stored under ``proj_name`` where the shape changes."""

  def __init__(self, cin, planes, stride, bottleneck, proj_name):
    super().__init__()
    self.proj_name = proj_name
    if bottleneck:
      shapes = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, 4 * planes, 1, 1)]
    else:
      shapes = [(cin, planes, 3, stride), (planes, planes, 3, 1)]
    for i, (a, b, k, s) in enumerate(shapes, 1):
      conv, bn = _conv_bn(a, b, k, s)
      setattr(self, f'conv{i}', conv)
      setattr(self, f'bn{i}', bn)
    self.depth = len(shapes)
    cout = shapes[-1][1]
    if stride != 1 or cin != cout:
      setattr(self, proj_name, nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

  def forward(self, x):
    y = x
    for i in range(1, self.depth + 1):
      y = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(y))
      if i < self.depth:
        y = F.relu(y)
    proj = getattr(self, self.proj_name, None)
    return F.relu(y + (x if proj is None else proj(x)))


class ResNet(nn.Module):
  def __init__(self, stage_sizes, widths, num_classes, bottleneck=False, stem_width=64, imagenet_stem=False,
               proj_name='shortcut', head_name='linear', pool_window=None):
    super().__init__()
    self.imagenet_stem, self.head_name, self.pool_window = imagenet_stem, head_name, pool_window
    if imagenet_stem:
      self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem_width)
    cin = stem_width
    self.num_stages = len(stage_sizes)
    for s, (n, planes) in enumerate(zip(stage_sizes, widths)):
      blocks = []
      for i in range(n):
        blocks.append(_Residual(cin, planes, (1 if s == 0 else 2) if i == 0 else 1, bottleneck, proj_name))
        cin = planes * (4 if bottleneck else 1)
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    setattr(self, head_name, nn.Linear(cin, num_classes))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.imagenet_stem:
      x = F.max_pool2d(x, 3, 2, 1)
    for s in range(self.num_stages):
      x = getattr(self, f'layer{s + 1}')(x)
    x = F.avg_pool2d(x, self.pool_window) if self.pool_window else F.adaptive_avg_pool2d(x, 1)
    features = x.flatten(1)
    return getattr(self, self.head_name)(features), features


class _WideBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

  def forward(self, x):
    a = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return y + (x if self.convShortcut is None else self.convShortcut(a))


class _WideGroup(nn.Module):
  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  def __init__(self, depth, k, num_classes):
    super().__init__()
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = _WideGroup(n, 16, 16 * k, 1)
    self.block2 = _WideGroup(n, 16 * k, 32 * k, 2)
    self.block3 = _WideGroup(n, 32 * k, 64 * k, 2)
    self.bn1 = nn.BatchNorm2d(64 * k)
    self.fc = nn.Linear(64 * k, num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    features = F.adaptive_avg_pool2d(F.relu(self.bn1(x)), 1).flatten(1)
    return self.fc(features), features


class VGG(nn.Module):
  def __init__(self, blocks, num_classes):
    super().__init__()
    cin = 3
    for b, widths in enumerate(blocks):
      layers = []
      for w in widths:
        layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
      setattr(self, f'block{b}', nn.Sequential(*layers[:-1]))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    height = x.shape[2]
    for b in range(5):
      x = F.relu(getattr(self, f'block{b}')(x))
      if b < 3 or (b == 3 and height == 64):
        x = F.max_pool2d(x, 2)
    features = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return self.classifier(features), features


def _conv_bn_relu6(cin, cout, kernel, stride=1, groups=1):
  return nn.Sequential(*_conv_bn(cin, cout, kernel, stride, groups), nn.ReLU6())


class _InvertedResidual(nn.Module):
  def __init__(self, cin, cout, stride, t):
    super().__init__()
    hidden = cin * t
    layers = [_conv_bn_relu6(cin, hidden, 1)] if t != 1 else []
    layers += [_conv_bn_relu6(hidden, hidden, 3, stride, hidden), *_conv_bn(hidden, cout, 1)]
    self.conv = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
  """Width 1.0 (every channel count is already a multiple of 8)."""

  def __init__(self, num_classes, dropout):
    super().__init__()
    stages = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = [_conv_bn_relu6(3, 32, 3, 2)], 32
    for t, c, n, s in stages:
      for i in range(n):
        layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
        cin = c
    layers.append(_conv_bn_relu6(cin, 1280, 1))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

  def forward(self, x):
    features = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
    return self.classifier(features), features


# Conv widths per block, the references' cfg S (vgg8), A (11), B (13), D (16), E (19).
_VGG_CONFIGS = {8: [[64], [128], [256], [512], [512]],
                11: [[64], [128], [256] * 2, [512] * 2, [512] * 2],
                13: [[64] * 2, [128] * 2, [256] * 2, [512] * 2, [512] * 2],
                16: [[64] * 2, [128] * 2, [256] * 3, [512] * 3, [512] * 3],
                19: [[64] * 2, [128] * 2, [256] * 4, [512] * 4, [512] * 4]}
_TINY = dict(proj_name='downsample', head_name='fc', pool_window=8)
_IMAGENET = dict(imagenet_stem=True, proj_name='downsample', head_name='fc')


def build(arch, num_classes=10, dropout=0.0):
  """The torch counterpart of zoo architecture ``arch``."""
  if arch.startswith('resnet') and arch.endswith('_imagenet'):
    sizes = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3)}[arch[:-len('_imagenet')]]
    return ResNet(sizes, (64, 128, 256, 512), num_classes, bottleneck=arch.startswith('resnet50'), **_IMAGENET)
  if arch in ('resnet18', 'resnet34', 'resnet50'):
    sizes = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3)}[arch]
    return ResNet(sizes, (64, 128, 256, 512), num_classes, bottleneck=arch == 'resnet50')
  if arch.startswith('resnet'):
    wide = arch.endswith('x4')
    n = (int(arch[len('resnet'):].removesuffix('x4')) - 2) // 6
    filters = (32, 64, 128, 256) if wide else (16, 16, 32, 64)
    return ResNet((n, n, n), filters[1:], num_classes, stem_width=filters[0], **_TINY)
  if arch.startswith('wrn'):
    depth, k = map(int, arch[len('wrn'):].split('_'))
    return WideResNet(depth, k, num_classes)
  if arch.startswith('vgg'):
    return VGG(_VGG_CONFIGS[int(arch[len('vgg'):])], num_classes)
  if arch == 'mobilenetv2':
    return MobileNetV2(num_classes, dropout)
  raise KeyError(arch)
