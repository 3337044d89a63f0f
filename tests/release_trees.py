"""NF-ResNet / NF-RegNet parameter trees (paths -> shapes) in DeepMind's naming.

As DeepMind's release (deepmind-research/nfnets,
nf_resnet.py, nf_regnet.py, base.py) names and shapes them: top modules
'NF_ResNet' / 'NF_RegNet'; blocks are classes NFResBlock / NFBlock, so
Haiku names them 'nf_res_block[_i]' / 'nf_block[_i]'; their WSConv2Ds always
have w, gain, bias; SqueezeExcite's unnamed hk.Linears are 'linear' and
'linear_1'; the classifier is an unnamed hk.Linear ('linear'). Built here
from the release's arithmetic, independently of nfnets.models.
"""


def _conv(tree, path, k, cin, cout, groups=1):
  tree[path] = {'w': (k, k, cin // groups, cout), 'gain': (cout,),
                'bias': (cout,)}


def _se(tree, path, ch, ratio):
  hidden = max(1, int(ch * ratio))
  tree[f'{path}/~/squeeze_excite/~/linear'] = {'w': (ch, hidden),
                                               'b': (hidden,)}
  tree[f'{path}/~/squeeze_excite/~/linear_1'] = {'w': (hidden, ch), 'b': (ch,)}


def regnet_tree(widths, depth, num_classes, width=0.75):
  tree, top = {}, 'NF_RegNet'
  ch = int(widths[0] * width)
  _conv(tree, f'{top}/~/initial_conv', 3, 3, ch)
  index = 0
  for block_width, stage_depth in zip(widths, depth):
    for block_index in range(stage_depth):
      out_ch = int(block_width * width)
      inner = int(ch * (1 if index == 0 else 2.25))
      groups = inner // 8
      inner = groups * 8
      b = f'{top}/~/nf_block' + (f'_{index}' if index else '')
      _conv(tree, f'{b}/~/conv0', 1, ch, inner)
      _conv(tree, f'{b}/~/conv1', 3, inner, inner, groups)
      _conv(tree, f'{b}/~/conv2', 1, inner, out_ch)
      if block_index == 0 or ch != out_ch:  # every stage starts strided
        _conv(tree, f'{b}/~/conv_shortcut', 1, ch, out_ch)
      _se(tree, b, inner, 0.5)
      tree[b] = {'skip_gain': ()}
      ch, index = out_ch, index + 1
  head = int(1280 * ch // 440)
  _conv(tree, f'{top}/~/final_conv', 1, ch, head)
  tree[f'{top}/~/linear'] = {'w': (head, num_classes), 'b': (num_classes,)}
  return tree


def resnet_tree(depth, use_se, num_classes, width=4):
  tree, top = {}, 'NF_ResNet'
  ch = int(16 * width)
  _conv(tree, f'{top}/~/initial_conv', 7, 3, ch)
  index = 0
  for block_width, stage_depth, stride in zip(
      [w * width for w in (64, 128, 256, 512)], depth, (1, 2, 2, 2)):
    for block_index in range(stage_depth):
      inner = int(block_width * 0.25)
      b = f'{top}/~/nf_res_block' + (f'_{index}' if index else '')
      _conv(tree, f'{b}/~/conv0', 1, ch, inner)
      _conv(tree, f'{b}/~/conv1', 3, inner, inner)
      _conv(tree, f'{b}/~/conv2', 1, inner, block_width)
      if (stride if block_index == 0 else 1) > 1 or ch != block_width:
        _conv(tree, f'{b}/~/conv_shortcut', 1, ch, block_width)
      if use_se:
        _se(tree, b, block_width, 0.25)
      tree[b] = {'skip_gain': ()}
      ch, index = block_width, index + 1
  tree[f'{top}/~/linear'] = {'w': (ch, num_classes), 'b': (num_classes,)}
  return tree
