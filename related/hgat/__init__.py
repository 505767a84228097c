"""HGAT-FC, the hierarchical graph-attention head (the public ``hgat_fc.py``: ``BGATLayer``, ``Head``,
``HGAT_FC``, a modification of ML-GCN's training code): the paper's primary classifier replaced by a head
that reasons over attribute groups, then over the attributes of each group (``head.py``).

``--hgat-layer``: ``gat`` (both graph-attention layers: the write-up's exp1 and design), ``fc`` (each
replaced by a BasicLinear: layer 1 over the flattened group nodes, layer 2 node by node as the file
declares it, or flattened with ``--hgat-fc-layer2 flat``), ``none`` (both left out: exp2, the baseline, and
what the public file runs, its calls commented out). The attribute groups come from
:data:`GROUPS` (by body region, for the datasets' own attribute names) or ``--hgat-groups FILE.json``.
"""
import collections
import json
import os

from common.errors import UserError

NAME = 'hgat'
HEAD = ('hgat', 'HGAT-FC: graph attention over attribute groups, then over the attributes of each group')
FIXED = ('hgat_layer', 'hgat_fc_layer2', 'hgat_groups', 'hgat_group_channels', 'hgat_class_channels')
RANGES = (('hgat_group_channels', lambda v: v >= 2, 'at least 2'),
          ('hgat_class_channels', lambda v: v >= 2, 'at least 2'))
Settings = collections.namedtuple('Settings', 'layer group_channels class_channels fc_layer2')

# The attribute groups by body region, written once, with the names each dataset uses (its own order is
# kept in the network's outputs: the head permutes into group order and back).
GROUPS = {
    'wider': collections.OrderedDict([
        ('head', ['longHair', 'sunglass', 'Hat', 'faceMask']),
        ('upper body', ['Tshiirt', 'longSleeve', 'formal', 'logo', 'stripe']),
        ('lower body', ['shorts', 'jeans', 'longPants', 'skirt']),
        ('whole body', ['Male'])]),
    'peta': collections.OrderedDict([
        ('head', ['accessoryHat', 'accessoryMuffler', 'accessoryNothing', 'accessorySunglasses', 'hairLong']),
        ('upper body', ['upperBodyCasual', 'upperBodyFormal', 'upperBodyJacket', 'upperBodyLogo',
                        'upperBodyPlaid',
                        'upperBodyShortSleeve', 'upperBodyThinStripes', 'upperBodyTshirt', 'upperBodyOther',
                        'upperBodyVNeck']),
        ('lower body', ['lowerBodyCasual', 'lowerBodyFormal', 'lowerBodyJeans', 'lowerBodyShorts',
                        'lowerBodyShortSkirt', 'lowerBodyTrousers', 'footwearLeatherShoes', 'footwearSandals',
                        'footwearShoes', 'footwearSneaker']),
        ('accessories', ['carryingBackpack', 'carryingOther', 'carryingMessengerBag', 'carryingNothing',
                         'carryingPlasticBags']),
        ('whole body',
         ['personalLess30', 'personalLess45', 'personalLess60', 'personalLarger60', 'personalMale'])]),
    'pa100k': collections.OrderedDict([
        ('head', ['Hat', 'Glasses']),
        ('upper body',
         ['ShortSleeve', 'LongSleeve', 'UpperStride', 'UpperLogo', 'UpperPlaid', 'UpperSplice']),
        ('lower body',
         ['LowerStripe', 'LowerPattern', 'LongCoat', 'Trousers', 'Shorts', 'Skirt&Dress', 'boots']),
        ('accessories', ['HandBag', 'ShoulderBag', 'Backpack', 'HoldObjectsInFront']),
        ('whole body', ['Female', 'AgeOver60', 'Age18-60', 'AgeLess18', 'Front', 'Side', 'Back'])]),
    # the embedded demo: what the digits are, their colours, where they are
    'demo': collections.OrderedDict([
        ('digits', ['many_digits', 'has_zero', 'has_seven', 'has_pair']),
        ('colours', ['has_red', 'all_same_colour', 'red_zero']),
        ('places',
         ['center_filled', 'top_row_empty', 'even_in_center', 'one_in_top_row', 'three_at_bottom'])]),
}


def add_flags(a):
    a('--hgat-layer', choices=['gat', 'fc', 'none'], default='gat',
      help='HGAT-FC: the two graph-attention layers (gat), each replaced by a fully connected layer (fc: '
           'see --hgat-fc-layer2), or left out (none: the baseline, what the public file runs)')
    a('--hgat-fc-layer2', choices=['node', 'flat'], default=None,
      help="with --hgat-layer fc, layer 2's replacement: one BasicLinear C -> C per group applied to each "
           "attribute node (node, default: as the public file declares it) or one over the group's "
           "flattened nodes, n*C -> n*C (flat: this project's reading before; runs made before the option "
           "keep it)")
    a('--hgat-groups', help="HGAT-FC attribute groups: a JSON file {group: [attribute names]} covering every "
                            "attribute once, or contiguous:G (G consecutive groups in the dataset's order, "
                            "the first n mod G of the n attributes one larger: 14 in 4 groups: 4, 4, 3, 3); "
                            "default: the built-in groups by body region of WIDER, PETA (35), PA-100K and "
                            "the demo")
    a('--hgat-group-channels', type=int, default=512, help='HGAT-FC width of a group node')
    a('--hgat-class-channels', type=int, default=256, help='HGAT-FC width of an attribute node')


def active(cfg):
    return cfg['head'] == 'hgat'


def settings(cfg):
    return Settings(cfg['hgat_layer'], int(cfg['hgat_group_channels']), int(cfg['hgat_class_channels']),
                    cfg.get('hgat_fc_layer2') or 'node')


def check(cfg):
    settings(cfg)
    spec = cfg['hgat_groups']
    if spec and not spec.startswith('contiguous:') and not os.path.isfile(spec):
        raise UserError('--hgat-groups %s: no such file (a JSON file {group: [attribute names]}, or '
                        'contiguous:G)' % spec)


def describe(cfg):
    if cfg['hgat_layer'] == 'fc' and cfg.get('hgat_fc_layer2') == 'flat':
        return 'HGAT-FC (fc, flat layer 2)'
    return 'HGAT-FC (%s)' % cfg['hgat_layer']


def _contiguous(count_names, spec):
    """``contiguous:G``: G consecutive groups; the first n mod G of them hold one attribute more
    (numpy.array_split's rule)."""
    try:
        count = int(spec.split(':', 1)[1])
    except ValueError:
        count = 0
    if not 1 <= count <= count_names:
        raise UserError('--hgat-groups %s: G must be a whole number from 1 to the %d attributes' % (
            spec, count_names))
    size, larger = divmod(count_names, count)
    bounds = [i * size + min(i, larger) for i in range(count + 1)]
    return [('group %d' % (i + 1), list(range(bounds[i], bounds[i + 1]))) for i in range(count)]


def partition(names, spec=None):
    """``[(group name, [attribute indices in the dataset's order])]`` for the dataset's attribute ``names``:
    from ``spec`` (a JSON file, or ``contiguous:G``) or the built-in groups whose names are exactly these."""
    names = list(names)
    if spec and spec.startswith('contiguous:'):
        return _contiguous(len(names), spec)
    if spec:
        try:
            with open(spec) as f:
                groups = json.load(f, object_pairs_hook=collections.OrderedDict)
        except (OSError, ValueError) as err:
            raise UserError('--hgat-groups %s is not a readable JSON file (%s)' % (spec, err))
        where = '--hgat-groups %s' % spec
        if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
            raise UserError('%s must hold one object {group: [attribute names]}' % where)
    else:
        groups = next((g for g in GROUPS.values() if sorted(sum(g.values(), [])) == sorted(names)), None)
        if groups is None:
            raise UserError('--head hgat needs the attribute groups of this dataset: give --hgat-groups '
                            'FILE.json ({group: [attribute names]}) or --hgat-groups contiguous:G (built in: '
                            '%s)'
                            % ', '.join(sorted(GROUPS)))
        where = 'the built-in groups'
    seen, out = {}, []
    for group, members in groups.items():
        if not members:
            raise UserError('%s: group %r is empty' % (where, group))
        indices = []
        for member in members:
            if member not in names:
                raise UserError('%s: %r (group %r) is not an attribute of this dataset (%s)' % (
                    where, member, group, ', '.join(names[:8]) + (', ...' if len(names) > 8 else '')))
            if member in seen:
                raise UserError('%s: %r is in two groups (%r and %r)' % (where, member, seen[member], group))
            seen[member] = group
            indices.append(names.index(member))
        out.append((str(group), indices))
    missing = [n for n in names if n not in seen]
    if missing:
        raise UserError('%s leave out %s: every attribute needs a group' % (where, ', '.join(missing)))
    return out


def plug(cfg, parts, labels=None, mask=None, names=None):
    """The HGAT-FC head as the primary classifier on the globally max-pooled feature. Its grouping is
    resolved from the attribute names when the run is built and kept in the config (``hgat_partition``),
    from which evaluation rebuilds it."""
    from related.hgat import head
    if cfg.get('hgat_partition') is None:
        if names is None and (cfg['hgat_groups'] or '').startswith('contiguous:'):
            names = ['attr%d' % i for i in range(cfg['num_classes'])]          # (only their number counts)
        if names is None:
            raise UserError('--head hgat needs the attribute names to group them (or a config that holds '
                            'hgat_partition)')
        cfg['hgat_partition'] = [[g, idx] for g, idx in partition(names, cfg['hgat_groups'])]
    groups = [idx for _, idx in cfg['hgat_partition']]
    s = settings(cfg)
    from model import Head
    parts.primary = Head(NAME, lambda width: head.HGATHead(width, groups, s.layer, s.group_channels,
                                                           s.class_channels, fc_layer2=s.fc_layer2,
                                                           prefix='hgat_'))
    parts.pool = 'max'
    parts.notes.append('HGAT-FC head (%d groups, graph layers: %s%s)' % (
        len(groups), s.layer, ', layer 2 %s' % s.fc_layer2 if s.layer == 'fc' else ''))


def loss(cfg):
    return None
