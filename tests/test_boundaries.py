"""Round 3 of the wiring tests: behaviours that a plausible bug could break without any other test
failing (each was planted and seen to fail: the note of the change that added this file says how).
Non-default settings reach the code that uses them, ties are broken the documented way, boundaries
(IoU exactly at the threshold, the first bad batch) land on the documented side."""
import json
import os

import numpy as np
import pytest
import mxnet as mx
from mxnet import nd

from engine import config
from evaluation import metrics
import predict
from engine import steps
import train
from common.errors import UserError
from tests import fixtures

TINY = ['--limit', '48', '--input-size', '32', '--batch_size', '16', '--log-interval', '1']


def _rows(out):
    rows = json.load(open(os.path.join(out, 'metrics.json')))
    return [{k: v for k, v in r.items() if k not in ('samples_per_sec', 'seconds')} for r in rows]


# 1. train.py hands its loss to the phase switch
# --------------------------------------------------------------
def test_train_py_switches_the_primary_term_off_in_the_first_phase_and_on_after(
        demo_path, tmp_path, monkeypatch):
    seen = []
    real = steps.train_step

    def spy(net, loss_fn, *args, **kwargs):
        seen.append((args[3], loss_fn.primary))          # (epoch, is the focal term on?)
        return real(net, loss_fn, *args, **kwargs)
    monkeypatch.setattr(steps, 'train_step', spy)
    train.main(['--data_path', demo_path, '--out', str(tmp_path / 'run'), '--preset', 'paper',
                '--freeze-epochs', '1',
                '--epochs', '2', '--input-size', '64'] + TINY[:2] + TINY[4:])
    assert sorted(set(seen)) == [(0, False), (1, True)]


# 2. the per-batch seed: other draws in every batch, the same ones after a resume
# ------------------------------
def test_the_in_graph_draws_differ_between_batches_and_repeat_after_a_resume(
        demo_path, tmp_path, monkeypatch):
    from related.mcloss.head import MCHead
    masks = []
    real = MCHead.cwa_mask

    def record(self, F, fmap):
        mask = real(self, F, fmap)
        if isinstance(mask, nd.NDArray):          # (not the symbolic pass that infers the shapes)
            masks.append(mask.asnumpy().copy())
        return mask
    monkeypatch.setattr(MCHead, 'cwa_mask', record)
    flags = TINY + ['--mc-loss', '--no-hybridize']
    straight, part = str(tmp_path / 'straight'), str(tmp_path / 'part')
    train.main(['--data_path', demo_path, '--out', straight, '--epochs', '2'] + flags)
    first = masks[:]
    del masks[:]
    train.main(['--data_path', demo_path, '--out', part, '--epochs', '1'] + flags)
    train.main(['--resume', part, '--epochs', '2'])
    batches = len(first) // 2
    assert batches == 3 and len(masks) == len(first)
    for a, b in zip(first, masks):
        np.testing.assert_array_equal(a, b)
    epoch0 = first[:batches]
    assert all(not np.array_equal(epoch0[i], epoch0[j]) for i in range(batches) for j in range(
        i + 1, batches))
    assert not np.array_equal(first[0], first[batches])          # and between epochs


# 3. every schedule value the README states
# --------------------------------------------------------------------
# (preset, dataset): optimizer, lr, patience, drops, batch, epochs, monitor, first phase (ImageNet weights)
README_SCHEDULES = {
    ('paper', 'wider'): ('sgd', 1e-3, 3, 2, 32, 40, 'mAP', 3),
    ('paper', 'csv'): ('sgd', 1e-3, 3, 2, 32, 40, 'mAP', 3),
    ('paper', 'peta'): ('adam', 1e-4, 8, 2, 32, 60, 'mA', 3),
    ('paper', 'pa100k'): ('adam', 1e-4, 8, 2, 32, 60, 'mA', 3),
    ('upstream', 'wider'): ('sgd', 1e-4, 10, 3, 24, 250, 'mAP', 0),
    ('upstream', 'lst'): ('sgd', 1e-4, 10, 3, 24, 250, 'mAP', 0),
    ('demo', 'demo'): ('adam', 1e-3, 3, 2, 32, 8, 'mAP', 0),
    # every form of WIDER (the authors' .lst and RecordIO files, a CSV) gets the WIDER schedules
    ('paper', 'lst'): ('sgd', 1e-3, 3, 2, 32, 40, 'mAP', 3),
    ('paper', 'rec'): ('sgd', 1e-3, 3, 2, 32, 40, 'mAP', 3),
    ('upstream', 'rec'): ('sgd', 1e-4, 10, 3, 24, 250, 'mAP', 0),
    ('upstream', 'csv'): ('sgd', 1e-4, 10, 3, 24, 250, 'mAP', 0),
    # PETA and PA-100K have no upstream schedule: the paper's
    ('upstream', 'peta'): ('adam', 1e-4, 8, 2, 32, 60, 'mA', 0),
    ('upstream', 'pa100k'): ('adam', 1e-4, 8, 2, 32, 60, 'mA', 0),
    # the community's files: Rethinking_of_PAR's configs (Adam 1e-4, batch 64, 30 epochs, patience 4)
    ('paper', 'pedes'): ('adam', 1e-4, 4, 6, 64, 30, 'mA', 3),
    ('upstream', 'pedes'): ('adam', 1e-4, 4, 6, 64, 30, 'mA', 0),
}


def test_every_dataset_form_has_a_documented_schedule():
    import datasets
    assert {d for _, d in README_SCHEDULES} == set(datasets.names())


@pytest.mark.parametrize('preset,dataset', sorted(README_SCHEDULES))
def test_each_preset_and_dataset_gets_the_schedule_the_readme_states(preset, dataset):
    cfg = config.defaults(preset=preset, dataset=dataset, pretrained=dataset != 'demo')
    got = tuple(cfg[k] for k in ('optimizer', 'lr', 'lr_patience', 'lr_drops', 'batch_size', 'epochs',
                                 'monitor',
                                 'freeze_epochs'))
    assert got == README_SCHEDULES[(preset, dataset)]
    assert cfg['shuffle'] == (preset != 'upstream') and cfg['pretrained'] == (dataset != 'demo')


# 4. resume refuses every fixed setting by name
# ----------------------------------------------------------------
# key -> (flag words, the value the message names); the tiny run below has the demo's settings
CHANGES = {
    'dataset': (['--dataset', 'wider'], 'wider'), 'preset': (['--preset', 'upstream'], 'upstream'),
    'backbone': (['--backbone', 'resnet34_v1'], 'resnet34_v1'), 'input_size': (['--input-size', '64'], '64'),
    'num_classes': (['--num_classes', '5'], '5'), 'lr': (['--lr', '0.5'], '0.5'),
    'batch_size': (['--batch_size', '8'], '8'), 'optimizer': (['--optimizer', 'sgd'], 'sgd'),
    'seed': (['--seed', '3'], '3'), 'train_split': (['--train-split', 'val'], 'val'),
    'partition': (['--partition', '2'], '2'), 'all_attributes': (['--all-attributes'], 'True'),
    'freeze_epochs': (['--freeze-epochs', '1'], '1'), 'finetune': (['--finetune'], 'True'),
    'gamma': (['--gamma', '2'], '2.0'), 'shuffle': (['--no-shuffle'], 'False'),
    'pretrained': (['--pretrained'], 'True'), 'taps': (['--taps', 's2'], 's2'), 'head': ([
        '--head', 'gcn'], 'gcn'),
    'rga': (['--rga', 's'], 's'), 'rga_stages': (['--rga-stages', '2,3'], '2,3'),
    'rga_ratios': (['--rga-ratios', '4,4,4'], '4,4,4'), 'gcn_embeddings': ([
        '--gcn-embeddings', 'cooc'], 'cooc'),
    'gcn_t': (['--gcn-t', '0.5'], '0.5'), 'gcn_p': (['--gcn-p', '0.2'], '0.2'),
    'gcn_reweight': (['--gcn-reweight', 'paper'], 'paper'), 'gcn_pool': (['--gcn-pool', 'avg'], 'avg'),
    'backbone_lr_mult': (['--backbone-lr-mult', '0.1'], '0.1'), 'mc_loss': (['--mc-loss'], 'True'),
    'mc_weights': (['--mc-weights', '1,2'], '1,2'), 'mc_drop': (['--mc-drop', '0.2'], '0.2'),
    'mc_xi': (['--mc-xi', '4'], '4'), 'apcnn_topk': (['--apcnn-topk', '3,2,1'], '3,2,1'),
    'apcnn_anchors': (['--apcnn-anchors', '32,64,128'], '32,64,128'), 'apcnn_iou': ([
        '--apcnn-iou', '0.1'], '0.1'),
    'apcnn_drop': (['--apcnn-drop', '0.2,0.2'], '0.2,0.2'),
    'hgat_layer': (['--hgat-layer', 'fc'], 'fc'), 'hgat_fc_layer2': (['--hgat-fc-layer2', 'flat'], 'flat'),
    'hgat_groups': (['--hgat-groups', 'contiguous:2'],
                                                                  'contiguous:2'),
    'hgat_group_channels': (['--hgat-group-channels', '64'], '64'),
    'hgat_class_channels': (['--hgat-class-channels', '32'], '32'),
    'split_file': (['--split-file', 'dataset_zs_run0.pkl'], 'dataset_zs_run0.pkl'),
}


@pytest.fixture(scope='module')
def finished_run(demo_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('fixed') / 'run')
    train.main(['--data_path', demo_path, '--out', out, '--epochs', '1'] + TINY)
    return out


def test_the_table_of_changes_covers_every_fixed_setting():
    assert set(CHANGES) == set(config.RESUME_FIXED)


@pytest.mark.parametrize('key', sorted(CHANGES))
def test_resume_refuses_a_changed_fixed_setting_by_name(finished_run, key):
    words, shown = CHANGES[key]
    saved = json.load(open(os.path.join(finished_run, 'config.json')))
    flag = '--' + (key.replace('_', '-') if key != 'num_classes' else key)
    with pytest.raises(UserError) as err:
        train.main(['--resume', finished_run, '--epochs', '3'] + words)
    message = str(err.value)
    assert '--resume %s continues that run as it was configured' % finished_run in message
    named = '%s %s (the run has %s)' % (flag, shown, saved.get(key))
    assert named in message, message


# 5, 6. the ML-GCN graph from the masked labels, in the form asked for
# -----------------------------------------
def _graph_by_hand(labels, mask, t, p, reweight):
    """The label graph from scratch: loops over samples (only both-specified pairs count), then the
    released gen_A/gen_adj (code) or the paper's Eq. 8 with D^-1/2 A D^-1/2."""
    c = labels.shape[1]
    joint, counts = np.zeros((c, c)), np.zeros((c, c))
    for y, m in zip(labels, mask):
        for i in range(c):
            for j in range(c):
                if m[i] and m[j] and y[i]:
                    counts[i, j] += 1
                    joint[i, j] += 1 if (y[j] and i != j) else 0
    prob = np.where(counts > 0, joint / np.maximum(counts, 1), 0)
    a = (prob >= t).astype(float)
    np.fill_diagonal(a, 0)
    if reweight == 'code':
        a = a * p / (a.sum(0, keepdims=True) + 1e-6) + np.eye(c)
        d = np.diag(a.sum(1) ** -0.5)
        return d @ a.T @ d
    cols = a.sum(0, keepdims=True)
    a = np.where(cols > 0, a * p / np.where(cols > 0, cols, 1), 0) + (1 - p) * np.eye(c)
    d = np.diag(a.sum(1) ** -0.5)
    return d @ a @ d


@pytest.mark.parametrize('reweight', ['code', 'paper'])
def test_the_gcn_head_is_built_from_the_masked_labels_in_the_form_asked_for(reweight):
    from engine.build import build_net
    rng = np.random.RandomState(3)
    labels = (rng.rand(60, 5) < 0.5).astype(np.float32)
    mask = (rng.rand(60, 5) > 0.3).astype(np.float32)
    # unspecified entries hold a 1 that must not count
    labels[mask == 0] = 1
    cfg = config.defaults(backbone='resnet18_v1', input_size=32, num_classes=5, dataset=None, head='gcn',
                          gcn_reweight=reweight, gcn_t=0.3, gcn_p=0.2)
    net = build_net(cfg, [mx.cpu()], labels=labels, mask=mask)
    adjacency = [p for n, p in net.primary_head.collect_params().items()
                 if n.endswith('_adjacency')][0].data().asnumpy()
    np.testing.assert_allclose(adjacency, _graph_by_hand(labels, mask, 0.3, 0.2, reweight), rtol=1e-5,
                               atol=1e-6)
    other = 'paper' if reweight == 'code' else 'code'
    assert not np.allclose(adjacency, _graph_by_hand(labels, mask, 0.3, 0.2, other), atol=1e-3)
    assert not np.allclose(adjacency, _graph_by_hand(labels, np.ones_like(mask), 0.3, 0.2, reweight),
                           atol=1e-3)


# 7. --mc-weights are the weights used
# -------------------------------------------------------------------------
def test_the_mc_weights_given_are_the_weights_of_the_objective():
    class Split(object):
        labels = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
        mask = np.ones_like(labels)

        def __len__(self):
            return 3
    cfg, _ = config.parse_args(['--mc-loss', '--mc-weights', '0.3,7', '--epochs', '1'])
    cfg['num_classes'] = 2                          # (train.get_data sets it from the dataset)
    loss, _ = train.get_losses(cfg, Split(), [mx.cpu()])
    dis, div = nd.array([2.0, 4.0]), nd.array([0.5, 0.25])
    np.testing.assert_allclose(loss.aux.weigh(dis, div).asnumpy(), [0.3 * 2 + 7 * 0.5, 0.3 * 4 + 7 * 0.25],
                               rtol=1e-6)


# 8. AP-CNN's NMS exactly at the threshold
# ---------------------------------------------------------------------
def test_apcnn_nms_suppresses_a_box_at_exactly_the_iou_threshold():
    """Two 21 x 21 boxes ("+1" sides) that overlap by 2 columns: IoU = 42 / (441 + 441 - 42) = 0.05 exactly.
    The released cpu_nms suppresses at IoU >= 0.05: only the higher score survives; one column less
    (IoU 21 / 861 < 0.05) and both survive. Run by the pyramid's own NMS, with its threshold."""
    from related.apcnn.roi import ROIPyramid
    pyramid = ROIPyramid(64, (8, 4, 2))
    for shift, kept in ((19, [0.9]), (20, [0.9, 0.8])):
        boxes = np.array([[0, 0, 20, 20], [shift, 0, shift + 20, 20]], np.float32)
        scores = np.array([0.8, 0.9], np.float32)                   # the second box scores higher
        data = np.concatenate([scores[:, None], boxes + np.array([0, 0, 1, 1], np.float32)], 1)[None]
        out = pyramid.nms(nd, nd.array(data), 2)[0].asnumpy()
        np.testing.assert_allclose([r[0] for r in out if r[0] >= 0], kept, rtol=1e-6)
        if len(kept) == 1:
            np.testing.assert_array_equal(out[0, 1:], [shift, 0, shift + 21, 21])     # the higher-scored box


# 9. instance metrics ignore unspecified entries
# ---------------------------------------------------------------
def test_a_high_score_at_an_unspecified_entry_moves_no_instance_metric():
    rng = np.random.RandomState(5)
    probs = rng.rand(30, 6)
    labels = (rng.rand(30, 6) < 0.4).astype(np.float64)
    mask = (rng.rand(30, 6) > 0.25).astype(np.float64)
    base = metrics.instance_based(probs, labels, mask)
    raised = probs.copy()
    raised[mask == 0] = 0.99                                  # every unspecified entry predicted positive
    lowered = probs.copy()
    lowered[mask == 0] = 0.01
    for other in (raised, lowered):
        assert metrics.instance_based(other, labels, mask) == base
    assert metrics.instance_based(raised, labels, np.ones_like(mask)) != metrics.instance_based(
        lowered, labels, np.ones_like(mask))              # (the same change does move them when specified)


# 10. --threshold val: of equally good thresholds, the one nearest 0.5
# -----------------------------------------
def test_of_equally_good_thresholds_the_one_nearest_one_half_wins():
    # scores 0.1 (neg), 0.2 (pos), 0.8 (neg), 0.9 (pos): t = 0.2 and t = 0.9 both give (TPR + TNR) / 2 = 0.75
    p, y = np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, True, False, True])
    assert predict.best_threshold(p, y) == pytest.approx(0.2)
    # 0.35 (neg 0.3 below) and 0.6 tie at 0.75 again: 0.6 is the nearer
    assert predict.best_threshold(np.array([0.3, 0.35, 0.55, 0.6]), y) == pytest.approx(0.6)
    assert predict.best_threshold(np.array([0.3, 0.6]), np.array([False, True])) == pytest.approx(0.5)
    # nothing to balance
    assert predict.best_threshold(np.array([0.3, 0.6]), np.array([True, True])) == 0.5


# 11. the prediction history restored on resume, when it holds predictions
# -------------------------------------
def test_resume_restores_a_history_that_holds_predictions(demo_path, tmp_path):
    flags = TINY + ['--history-start', '0', '--history-track', '2']
    straight, part = str(tmp_path / 'straight'), str(tmp_path / 'part')
    train.main(['--data_path', demo_path, '--out', straight, '--epochs', '3'] + flags)
    train.main(['--data_path', demo_path, '--out', part, '--epochs', '2'] + flags)
    train.main(['--resume', part, '--epochs', '3'])
    assert _rows(part) == _rows(straight)


def test_the_restored_history_is_the_saved_one(demo_path, tmp_path):
    from engine import checkpoints
    from losses import PredictionHistory
    out = str(tmp_path / 'run')
    train.main(['--data_path', demo_path, '--out', out, '--epochs', '2'] + TINY +
               ['--history-start', '0', '--history-track', '2'])
    _, arrays = checkpoints.read_meta(os.path.join(out, 'checkpoints', 'last.params'))
    saved = arrays['history/buffer'].asnumpy()
    assert (saved != 0).any()                                     # it holds predictions
    history = PredictionHistory(saved.shape[0], saved.shape[2], track=2, start_epoch=0)
    history.load_state_dict({k[len('history/'):]: v for k, v in arrays.items() if k.startswith('history/')})
    np.testing.assert_array_equal(history.buffer.asnumpy(), saved)


# 12. the WIDER crop-cache key
# ---------------------------------------------------------------------------------
def _mean(image):
    return np.asarray(image, np.float64).reshape(-1, 3).mean(0)


def test_the_crop_cache_follows_a_replaced_scene_a_moved_box_and_a_renamed_file(tmp_path):
    import cv2
    import datasets
    from datasets import wider
    root = str(tmp_path / 'W')
    fixtures.wider(root)
    cache = str(tmp_path / 'crops')
    scene = os.path.join(root, 'Image', 'train', '0--Parade', 'p0.jpg')
    bgr = cv2.imread(scene)
    cv2.imencode('.bmp', bgr)[1].tofile(scene)      # uncompressed: new content below keeps the file's size
    box = [5, 10, 30, 50]
    key = wider.crop_name(scene, 'train/0--Parade/p0.jpg', box)
    assert wider.crop_name(scene, 'train/0--Parade/p0.jpg', [5, 10, 30, 51]) != key          # the box
    assert wider.crop_name(scene, 'train/0--Parade/p0b.jpg', box) != key                     # the file name
    before = datasets.get_split('wider', root, 'trainval', cache_dir=cache)
    stat = os.stat(scene)
    # other colours, same size
    cv2.imencode('.bmp', np.ascontiguousarray(bgr[:, :, ::-1]))[1].tofile(scene)
    os.utime(scene, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert os.path.getsize(scene) == stat.st_size
    assert wider.crop_name(scene, 'train/0--Parade/p0.jpg', box) != key                      # the content
    after = datasets.get_split('wider', root, 'trainval', cache_dir=cache)
    got, was = _mean(after[0][0]), _mean(before[0][0])
    assert not np.allclose(got, was, atol=12), (got, was)
    # the new scene's colours, not the cached crop
    np.testing.assert_allclose(got, was[::-1], atol=12)
    # other scenes: their crops
    np.testing.assert_allclose(_mean(after[2][0]), _mean(before[2][0]), atol=1)


# 13. the divergence guard names the first bad batch
# -----------------------------------------------------------
def test_the_guard_names_the_first_batch_whose_loss_is_not_finite():
    from engine.runfolder import FiniteGuard

    class Folder(object):
        def last_good(self):
            return 'The last good checkpoint is X'
    guard = FiniteGuard(mx.cpu(), 4, Folder())
    for batch in range(7):
        guard.add(batch, nd.array([np.nan if batch in (3, 5) else 1.0]))
    with pytest.raises(UserError, match='in epoch 4 at batch 3;'):
        guard.check()
    clean = FiniteGuard(mx.cpu(), 0, Folder())
    for batch in range(3):
        clean.add(batch, nd.array([float(batch)]))
    clean.check()


# 2. both ends of every range a flag has, through the parser a user reaches
# ----------------------------------------------------------------
# flag -> (values accepted, values refused), written from each flag's help text, not from flags.RANGES.
FLAG_BOUNDS = {
    '--epochs': (['1'], ['0', '-1']), '--batch_size': (['1'], ['0']),
    '--lr': (['1e-12', '10'], ['0', '-1e-9', 'inf', 'nan']), '--wd': (['0'], ['-1e-9', 'nan']),
    '--mom': (['0', '0.999'], ['1', '-0.01', 'nan']), '--gamma': (['0'], ['-0.5', 'inf']),
    '--freeze-epochs': (['0'], ['-1']), '--history-start': (['0'], ['-1']), '--history-track': (['1'], ['0']),
    '--lr-patience': (['0'], ['-1']), '--lr-drops': (['0'], ['-1']), '--limit': (['1'], ['0']),
    '--num-workers': (['0'], ['-1']), '--cpus': (['1'], ['0']), '--log-interval': (['1'], ['0']),
    '--partition': (['0', '4'], ['-1', '5']),        # PETA's and RAP's five numbered runs: 0..4
    '--input-size': (['32'], ['31']), '--backbone-lr-mult': (['0'], ['-0.1', 'nan']),
    '--apcnn-iou': (['1', '1e-6'], ['0', '1.01', 'nan']), '--hgat-group-channels': (['2'], ['1']),
    '--hgat-class-channels': (['2'], ['1']), '--mc-drop': (['0', '0.99'], ['1', '-0.1', 'nan']),
    '--mc-xi': (['0', '2'], ['1', '-1']), '--gcn-t': (['1', '1e-6'], ['0', '1.5', 'nan']),
    '--gcn-p': (['0', '1'], ['-0.1', '1.1', 'nan']),
}


def test_every_ranged_flag_is_in_the_table():
    ranged = {'--' + key.replace('_', '-') if key not in ('batch_size',) else '--batch_size'
              for key, _, _ in config.RANGES}
    assert ranged == set(FLAG_BOUNDS)


@pytest.mark.parametrize('flag', sorted(FLAG_BOUNDS))
def test_both_ends_of_every_flag_range(flag):
    accepted, refused = FLAG_BOUNDS[flag]
    base = ['--epochs', '5'] if flag != '--epochs' else []
    for value in accepted:
        cfg, _ = config.parse_args(base + ['%s=%s' % (flag, value)])
        key = flag[2:].replace('-', '_')
        assert float(cfg[key]) == float(value) or (value == '1e-12' and cfg[key] == 1e-12), (flag, value)
    for value in refused:
        with pytest.raises(UserError, match=r'^%s must be ' % flag.replace('_', '-').replace(
                '--batch-size', '--batch_size')):
            config.parse_args(base + ['%s=%s' % (flag, value)])


def test_the_fifth_run_of_a_file_is_reached_through_every_script(tmp_path):
    """--partition 4 (the fifth of PETA's and RAP's runs) passes each script's early check, 5 does not."""
    from engine import startup
    import sys
    for script, argv in (('train', []), ('eval', ['RUN'])):
        assert startup.preparse(script, argv + ['--partition', '4']).partition == 4
        with pytest.raises(SystemExit) as stop:
            startup.preparse(script, argv + ['--partition', '5'])
        assert stop.value.code == 2
    assert sys.modules['mxnet']
