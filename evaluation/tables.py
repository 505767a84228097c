"""The numbers to compare with, and the tables that put ours beside them: the paper's (WIDER-Attribute,
PETA; ``eval.py --compare paper``) and the community baseline's (Rethinking_of_PAR's README;
``eval.py --compare rethinking``, in its metric convention)."""
from datasets.wider import WIDER_ATTRIBUTES

# The paper's numbers (ResNet-101 + VAA), for `eval.py --compare paper`.
PAPER_WIDER_AP = {
    'Male': 96, 'longHair': 88, 'sunglass': 74, 'Hat': 93, 'Tshiirt': 83, 'longSleeve': 96,
    'formal': 85, 'shorts': 93, 'jeans': 81, 'longPants': 96, 'skirt': 85, 'faceMask': 78,
    'logo': 90, 'stripe': 68}
PAPER_WIDER_MAP = 86.4
PAPER_WIDER_RESNET101_MAP = 83.7
PAPER_PETA = {'mA': 84.59, 'accuracy': 78.56, 'precision': 86.79, 'recall': 86.12, 'f1': 86.46}
# The community baseline, for `eval.py --compare rethinking`: the "Pedestrian Attribute Recognition" table of
# valencebond/Rethinking_of_PAR's README (256x192 input; trained on trainval, the model of the first lr drop,
# picked on test; resnet50* with Tan et al.'s weighted loss). (dataset, model, mA, Acc, Prec, Rec, F1).
RETHINKING_BASELINE = (
    ('PA100k', 'resnet50', 80.21, 79.15, 87.79, 87.01, 87.40),
    ('PA100k', 'resnet50*', 79.85, 79.13, 89.45, 85.40, 87.38),
    ('PA100k', 'resnet50 + EMA', 81.97, 80.20, 88.06, 88.17, 88.11),
    ('PA100k', 'bninception', 79.13, 78.19, 87.42, 86.21, 86.81),
    ('PA100k', 'TresnetM', 74.46, 68.72, 79.82, 80.71, 80.26),
    ('PA100k', 'swin_s', 82.19, 80.35, 87.85, 88.51, 88.18),
    ('PA100k', 'vit_s', 79.40, 77.61, 86.41, 86.22, 86.32),
    ('PA100k', 'vit_b', 81.01, 79.38, 87.60, 87.49, 87.55),
    ('PETA', 'resnet50', 83.96, 78.65, 87.08, 85.62, 86.35),
    ('PETAzs', 'resnet50', 71.43, 58.69, 74.41, 69.82, 72.04),
    ('RAPv1', 'resnet50', 79.27, 67.98, 80.19, 79.71, 79.95),
    ('RAPv2', 'resnet50', 78.52, 66.09, 77.20, 80.23, 78.68),
    ('RAPzs', 'resnet50', 71.76, 64.83, 78.75, 76.60, 77.66),
)


def paper_reference(dataset, names):
    """The paper's numbers that apply to an evaluation: WIDER-Attribute's (its 14 attributes, in
    order) or PETA's (the 35 usual attributes); None for anything the paper did not report."""
    if list(names) == list(WIDER_ATTRIBUTES):
        return dict(dataset='WIDER-Attribute', mAP=PAPER_WIDER_MAP,
                    per_attribute=PAPER_WIDER_AP,
                    resnet101_mAP=PAPER_WIDER_RESNET101_MAP)
    if dataset == 'peta' and len(names) == 35:
        return dict(PAPER_PETA, dataset='PETA')
    return None


def paper_line(result, dataset):
    """The paper's headline numbers next to ours, with the differences (points), where it has any."""
    ref = result.get('paper')
    if ref is None:
        return ('paper: no numbers to compare with: the paper reports WIDER-Attribute (its 14 attributes) '
                'and PETA (35 attributes), not %s' % dataset)
    ours = {k: 100 * (result[k] if result[k] is not None else float('nan'))
            for k in ('mAP', 'mA', 'accuracy', 'precision', 'recall', 'f1')}
    if ref['dataset'] == 'WIDER-Attribute':
        return 'paper (WIDER-Attribute, ResNet-101): mAP %.1f, ours %.2f (delta %+.2f); ResNet-101 without ' \
               'attention %.1f' % (ref['mAP'], ours['mAP'], ours['mAP'] - ref['mAP'], ref['resnet101_mAP'])
    keys = ('mA', 'accuracy', 'precision', 'recall', 'f1')
    return 'paper (PETA): ' + ', '.join(
        '%s %.2f, ours %.2f (delta %+.2f)' % (k, ref[k], ours[k], ours[k] - ref[k]) for k in keys)


def rethinking_table(result, system):
    """The community baseline's numbers (Rethinking_of_PAR's README) beside ours, in its convention."""
    where = result.get('community_dataset')
    rows = [r for r in RETHINKING_BASELINE if r[0] == where]
    header = '%-8s %-16s %6s %6s %6s %6s %6s' % ('dataset', 'model', 'mA', 'Acc', 'Prec', 'Rec', 'F1')
    lines = ["Rethinking_of_PAR's baseline (its README; mA and the instance metrics in its convention, "
             'p > 0.5, both sides):', header, '-' * len(header)]
    for row in rows or RETHINKING_BASELINE:
        lines.append('%-8s %-16s %6.2f %6.2f %6.2f %6.2f %6.2f' % row)
    keys = ('mA', 'accuracy', 'precision', 'recall', 'f1')
    ours = [100 * result[k] for k in keys]
    lines.append('%-8s %-16s %6.2f %6.2f %6.2f %6.2f %6.2f' % ((where or '-', 'ours') + tuple(ours)))
    lines.append('-' * len(header))
    if rows:
        lines.append('%-25s %+6.2f %+6.2f %+6.2f %+6.2f %+6.2f' % ((
            'ours - %s' % rows[0][1],) + tuple(o - b for o, b in zip(ours, rows[0][2:]))))
        lines.append('ours: %s; theirs: %s, 256x192 input, trained on trainval, the checkpoint picked on test'
                     % (system, rows[0][1]))
    else:
        lines.append('no baseline numbers for this data: they report %s (on their files, --dataset pedes)'
                     % ', '.join(dict.fromkeys(r[0] for r in RETHINKING_BASELINE)))
    return '\n'.join(lines)
