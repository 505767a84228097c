"""Rethinking_of_PAR (valencebond/Rethinking_of_PAR) transcribed as the tests' independent reference.

* :func:`get_pedestrian_metrics`: ``metrics/pedestrian_metrics.py`` line by line (NumPy only; its EasyDict
  result is a dict here);
* :func:`format_peta`, :func:`format_pa100k`, :func:`format_rap`, :func:`format_rap2`: the
  ``generate_data_description`` functions of ``dataset/pedes_attr/preprocess/format_*.py``, which read the
  datasets' .mat files and pickle an ``easydict.EasyDict``. Transcribed with the scripts' own statements;
  only the hard-coded counts (19000 PETA images, 80000/10000/10000 PA-100K ones, 41585 RAP and 84928 RAPv2
  ones, 152 RAPv2 attributes, 5 runs) come from the fixture's files instead, and the output file name is a
  parameter.
* :func:`write_peta_mat`, :func:`write_rap_mat`, :func:`write_rap2_mat`: small .mat files laid out where
  those scripts index them (PA-100K's is ``tests.fixtures.pa100k``).
"""
import os
import pickle

import numpy as np
import scipy.io
from easydict import EasyDict

PETA_GROUP_ORDER = [10, 18, 19, 30, 15, 7, 9, 11, 14, 21, 26, 29, 32, 33, 34, 6, 8, 12, 25, 27, 31, 13, 23,
                    24,
                    28, 4, 5, 17, 20, 22, 0, 1, 2, 3, 16]
PA100K_GROUP_ORDER = [7, 8, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 9, 10, 11, 12, 1, 2, 3, 0, 4,
                      5, 6]
RAP_GROUP_ORDER = [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
                   32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 1, 2, 3, 0, 4, 5, 6, 7, 8, 43, 44, 45, 46, 47,
                   48, 49, 50]
RAP2_GROUP_ORDER = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
                    32,
                    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 1, 2, 3, 4, 0, 5, 6, 7, 8, 9, 45, 46, 47,
                    48, 49, 50, 51, 52, 53]


# ---------------------------------------------------------------------------------------------- metrics

def get_pedestrian_metrics(gt_label, preds_probs, threshold=0.5, index=None):
    pred_label = preds_probs > threshold

    eps = 1e-20
    result = {}

    if index is not None:
        pred_label = pred_label[:, index]
        gt_label = gt_label[:, index]

    # label metrics
    gt_pos = np.sum((gt_label == 1), axis=0).astype(float)
    gt_neg = np.sum((gt_label == 0), axis=0).astype(float)
    true_pos = np.sum((gt_label == 1) * (pred_label == 1), axis=0).astype(float)
    true_neg = np.sum((gt_label == 0) * (pred_label == 0), axis=0).astype(float)
    false_pos = np.sum(((gt_label == 0) * (pred_label == 1)), axis=0).astype(float)
    false_neg = np.sum(((gt_label == 1) * (pred_label == 0)), axis=0).astype(float)

    label_pos_recall = 1.0 * true_pos / (gt_pos + eps)
    label_neg_recall = 1.0 * true_neg / (gt_neg + eps)
    label_ma = (label_pos_recall + label_neg_recall) / 2

    result['label_pos_recall'] = label_pos_recall
    result['label_neg_recall'] = label_neg_recall
    result['label_prec'] = true_pos / (true_pos + false_pos + eps)
    result['label_acc'] = true_pos / (true_pos + false_pos + false_neg + eps)
    result['label_f1'] = 2 * result['label_prec'] * result['label_pos_recall'] / (
        result['label_prec'] + result['label_pos_recall'] + eps)
    result['label_ma'] = label_ma
    result['ma'] = np.mean(label_ma)

    # instance metrics
    gt_pos = np.sum((gt_label == 1), axis=1).astype(float)
    true_pos = np.sum((pred_label == 1), axis=1).astype(float)
    intersect_pos = np.sum((gt_label == 1) * (pred_label == 1), axis=1).astype(float)
    union_pos = np.sum(((gt_label == 1) + (pred_label == 1)), axis=1).astype(float)

    instance_acc = intersect_pos / (union_pos + eps)
    instance_prec = intersect_pos / (true_pos + eps)
    instance_recall = intersect_pos / (gt_pos + eps)
    instance_f1 = 2 * instance_prec * instance_recall / (instance_prec + instance_recall + eps)  # noqa: F841

    instance_acc = np.mean(instance_acc)
    instance_prec = np.mean(instance_prec)
    instance_recall = np.mean(instance_recall)
    instance_f1 = 2 * instance_prec * instance_recall / (instance_prec + instance_recall + eps)

    result['instance_acc'] = instance_acc
    result['instance_prec'] = instance_prec
    result['instance_recall'] = instance_recall
    result['instance_f1'] = instance_f1
    result['error_num'], result['fn_num'], result['fp_num'] = false_pos + false_neg, false_neg, false_pos
    return result


# ---------------------------------------------------------------------------------------------- .mat files

def _cell(strings, shape=None):
    cell = np.empty((len(strings), 1), object)
    cell[:, 0] = list(strings)
    return cell if shape is None else cell.reshape(shape)


def write_peta_mat(save_dir, n=24, runs=5, seed=0):
    """PETA.mat as DeepMAR released it (``tests.fixtures.peta`` with ``runs`` partitions) and its images."""
    from tests import fixtures
    os.makedirs(save_dir, exist_ok=True)
    return fixtures.peta(save_dir, n=n, seed=seed, partitions=runs)


def write_rap_mat(save_dir, n=16, runs=5, seed=0):
    """RAP_annotation/RAP_annotation.mat (RAP v1): the struct format_rap.py indexes by position, [0] the
    partitions (trainval / test, 1-based, row vectors), [1] the n x 92 labels, [3] the 92 names, [5] the
    image names; and the images in RAP_dataset/."""
    from tests import fixtures
    rng = np.random.RandomState(seed)
    labels = (rng.rand(n, 92) < 0.3).astype(np.float64)
    names = ['CAM%02d_2014-02-15_2014021516%04d_tarid%d_frame%d_line1.png' % (i % 3 + 1, i, i, 100 + i)
             for i in range(n)]
    parts = np.empty((runs, 1), object)
    for r in range(runs):
        order = rng.permutation(n)
        parts[r, 0] = {'trainval_index': (order[:12] + 1)[None, :].astype(np.uint16),
                       'test_index': (order[12:] + 1)[None, :].astype(np.uint16)}
    os.makedirs(os.path.join(save_dir, 'RAP_annotation'), exist_ok=True)
    scipy.io.savemat(os.path.join(save_dir, 'RAP_annotation', 'RAP_annotation.mat'), {'RAP_annotation': {
        'partion': parts, 'data': labels, 'position': np.zeros((n, 16)),
        'attribute': _cell(['rap_attr%d' % i for i in range(92)]), 'attribute_chinese': _cell(['-'] * 92),
        'imagesname': _cell(names)}})
    for i, name in enumerate(names):
        fixtures._write(os.path.join(save_dir, 'RAP_dataset', name), fixtures.solid(fixtures.COLOURS[i % 6]))
    return labels, names


def write_rap2_mat(save_dir, n=16, runs=5, seed=0):
    """RAP_annotation/RAP_annotation.mat (RAP v2): the named fields format_rap2.py reads (``name``,
    ``attribute`` 152, ``data`` with 0 / 1 / 2, ``selected_attribute`` 54 one-based columns,
    ``partition_attribute`` runs of train / val / test indices); and the images in RAP_dataset/."""
    from tests import fixtures
    rng = np.random.RandomState(seed)
    labels = rng.choice([0, 1, 2], size=(n, 152), p=[.6, .3, .1]).astype(np.uint8)
    color = list(range(31, 45)) + list(range(53, 67)) + list(range(74, 88))
    selected = [c for c in range(152) if c not in color][:54]
    names = ['CAM%02d-2014-03-%02d-2014031710%04d-frame%d_%d.png' % (i % 4 + 1, i % 28 + 1, i, i, i)
             for i in range(n)]
    parts = np.empty((1, runs), object)
    for r in range(runs):
        order = rng.permutation(n)
        parts[0, r] = {'train_index': (order[:8] + 1)[None, :], 'val_index': (order[8:11] + 1)[None, :],
                       'test_index': (order[11:] + 1)[None, :]}
    os.makedirs(os.path.join(save_dir, 'RAP_annotation'), exist_ok=True)
    scipy.io.savemat(os.path.join(save_dir, 'RAP_annotation', 'RAP_annotation.mat'), {'RAP_annotation': {
        'name': _cell(names), 'attribute': _cell(['rap2_attr%d' % i for i in range(152)]), 'data': labels,
        'selected_attribute': (np.array(selected) + 1)[None, :], 'partition_attribute': parts}})
    for i, name in enumerate(names):
        fixtures._write(os.path.join(save_dir, 'RAP_dataset', name), fixtures.solid(fixtures.COLOURS[i % 6]))
    return labels, names


class Split(EasyDict):
    """The ``new_split`` of the zero-shot scripts (``index_*_split_id50_img300_ratio0.03_*.pkl``)."""


# ---------------------------------------------------------------------------------------------- format_*.py

def format_peta(save_dir, reorder=True, new_split=None, out_name=None, protocol=None):
    peta_data = scipy.io.loadmat(os.path.join(save_dir, 'PETA.mat'))
    dataset = EasyDict()
    dataset.description = 'peta'
    dataset.reorder = 'group_order'
    dataset.root = os.path.join(save_dir, 'images')
    count = peta_data['peta'][0][0][0].shape[0]                                     # (19000)
    dataset.image_name = [f'{i + 1:05}.png' for i in range(count)]

    raw_attr_name = [i[0][0] for i in peta_data['peta'][0][0][1]]
    raw_label = peta_data['peta'][0][0][0][:, 4:]

    dataset.label = raw_label
    dataset.attr_name = raw_attr_name

    dataset.label_idx = EasyDict()
    dataset.label_idx.eval = list(range(35))
    dataset.label_idx.color = list(range(35, 79))
    dataset.label_idx.extra = range(79, raw_label.shape[1])  # (79, 105)

    if reorder:
        dataset.label_idx.eval = PETA_GROUP_ORDER

    dataset.partition = EasyDict()
    dataset.partition.train = []
    dataset.partition.val = []
    dataset.partition.trainval = []
    dataset.partition.test = []

    dataset.weight_train = []
    dataset.weight_trainval = []

    if new_split is not None:
        train = np.array(new_split.train_idx)
        val = np.array(new_split.val_idx)
        test = np.array(new_split.test_idx)
        trainval = np.concatenate((train, val), axis=0)

        dataset.partition.train = train
        dataset.partition.val = val
        dataset.partition.trainval = trainval
        dataset.partition.test = test

        weight_train = np.mean(dataset.label[train], axis=0).astype(np.float32)
        weight_trainval = np.mean(dataset.label[trainval], axis=0).astype(np.float32)

        dataset.weight_train.append(weight_train)
        dataset.weight_trainval.append(weight_trainval)
        _dump(dataset, os.path.join(save_dir, out_name or 'dataset_zs_run0.pkl'), protocol)
    else:
        for idx in range(len(peta_data['peta'][0][0][3])):                          # (range(5))
            train = peta_data['peta'][0][0][3][idx][0][0][0][0][:, 0] - 1
            val = peta_data['peta'][0][0][3][idx][0][0][0][1][:, 0] - 1
            test = peta_data['peta'][0][0][3][idx][0][0][0][2][:, 0] - 1
            trainval = np.concatenate((train, val), axis=0)

            dataset.partition.train.append(train)
            dataset.partition.val.append(val)
            dataset.partition.trainval.append(trainval)
            dataset.partition.test.append(test)

            weight_train = np.mean(dataset.label[train], axis=0)
            weight_trainval = np.mean(dataset.label[trainval], axis=0)

            dataset.weight_train.append(weight_train)
            dataset.weight_trainval.append(weight_trainval)
        _dump(dataset, os.path.join(save_dir, out_name or 'dataset_all.pkl'), protocol)
    return dataset


def format_pa100k(save_dir, reorder=True, protocol=None):
    pa100k_data = scipy.io.loadmat(os.path.join(save_dir, 'annotation.mat'))

    dataset = EasyDict()
    dataset.description = 'pa100k'
    dataset.reorder = 'group_order'
    dataset.root = os.path.join(save_dir, 'data')

    n_train, n_val, n_test = (len(pa100k_data['%s_images_name' % s]) for s in ('train', 'val', 'test'))
    train_image_name = [pa100k_data['train_images_name'][i][0][0] for i in range(n_train)]
    val_image_name = [pa100k_data['val_images_name'][i][0][0] for i in range(n_val)]
    test_image_name = [pa100k_data['test_images_name'][i][0][0] for i in range(n_test)]
    dataset.image_name = train_image_name + val_image_name + test_image_name

    dataset.label = np.concatenate((pa100k_data['train_label'], pa100k_data['val_label'],
                                    pa100k_data['test_label']), axis=0)
    dataset.attr_name = [pa100k_data['attributes'][i][0][0] for i in range(26)]

    dataset.label_idx = EasyDict()
    dataset.label_idx.eval = list(range(26))

    if reorder:
        dataset.label_idx.eval = PA100K_GROUP_ORDER

    dataset.partition = EasyDict()
    dataset.partition.train = np.arange(0, n_train)
    dataset.partition.val = np.arange(n_train, n_train + n_val)
    dataset.partition.test = np.arange(n_train + n_val, n_train + n_val + n_test)
    dataset.partition.trainval = np.arange(0, n_train + n_val)

    dataset.weight_train = np.mean(dataset.label[dataset.partition.train], axis=0).astype(np.float32)
    dataset.weight_trainval = np.mean(dataset.label[dataset.partition.trainval], axis=0).astype(np.float32)

    _dump(dataset, os.path.join(save_dir, 'dataset_all.pkl'), protocol)
    return dataset


def format_rap(save_dir, reorder=True, protocol=None):
    data = scipy.io.loadmat(os.path.join(save_dir, 'RAP_annotation/RAP_annotation.mat'))

    dataset = EasyDict()
    dataset.description = 'rap'
    dataset.reorder = 'group_order'
    dataset.root = os.path.join(save_dir, 'RAP_dataset')
    count = len(data['RAP_annotation'][0][0][5])                                     # (41585)
    dataset.image_name = [data['RAP_annotation'][0][0][5][i][0][0] for i in range(count)]
    raw_attr_name = [data['RAP_annotation'][0][0][3][i][0][0] for i in range(92)]
    raw_label = data['RAP_annotation'][0][0][1]
    dataset.label = raw_label[:, np.array(range(51))]

    dataset.label = raw_label
    dataset.attr_name = raw_attr_name

    dataset.label_idx = EasyDict()
    dataset.label_idx.eval = list(range(51))
    dataset.label_idx.color = list(range(63, raw_label.shape[1]))  # (63, 92)
    dataset.label_idx.extra = list(range(51, 63))

    if reorder:
        dataset.label_idx.eval = RAP_GROUP_ORDER

    dataset.partition = EasyDict()
    dataset.partition.trainval = []
    dataset.partition.test = []

    dataset.weight_trainval = []

    for idx in range(len(data['RAP_annotation'][0][0][0])):                          # (range(5))
        trainval = data['RAP_annotation'][0][0][0][idx][0][0][0][0][0, :] - 1
        test = data['RAP_annotation'][0][0][0][idx][0][0][0][1][0, :] - 1

        dataset.partition.trainval.append(trainval)
        dataset.partition.test.append(test)

        weight_trainval = np.mean(dataset.label[trainval], axis=0).astype(np.float32)
        dataset.weight_trainval.append(weight_trainval)

    _dump(dataset, os.path.join(save_dir, 'dataset_all.pkl'), protocol)
    return dataset


def format_rap2(save_dir, reorder=True, new_split=None, version=0, protocol=None):
    data = scipy.io.loadmat(os.path.join(save_dir, 'RAP_annotation/RAP_annotation.mat'))
    data = data['RAP_annotation']
    dataset = EasyDict()
    dataset.description = 'rap2'
    dataset.reorder = 'group_order'
    dataset.root = os.path.join(save_dir, 'RAP_dataset')
    count = len(data['name'][0][0])                                                 # (84928)
    dataset.image_name = [data['name'][0][0][i][0][0] for i in range(count)]
    raw_attr_name = [data['attribute'][0][0][i][0][0] for i in range(152)]
    raw_label = data['data'][0][0]
    selected_attr_idx = (data['selected_attribute'][0][0][0] - 1)[RAP2_GROUP_ORDER].tolist()  # 54

    color_attr_idx = list(range(31, 45)) + list(range(53, 67)) + list(range(74, 88))  # 42
    extra_attr_idx = np.setdiff1d(range(152), color_attr_idx + selected_attr_idx).tolist()[:24]
    extra_attr_idx = extra_attr_idx[:15] + extra_attr_idx[16:]

    dataset.label = raw_label[:, selected_attr_idx + color_attr_idx + extra_attr_idx]  # (n, 119)
    dataset.attr_name = [raw_attr_name[i] for i in selected_attr_idx + color_attr_idx + extra_attr_idx]

    dataset.label_idx = EasyDict()
    dataset.label_idx.eval = list(range(54))  # 54
    dataset.label_idx.color = list(range(54, 96))
    dataset.label_idx.extra = list(range(96, 119))

    if reorder:
        dataset.label_idx.eval = list(range(54))

    dataset.partition = EasyDict()
    dataset.partition.train = []
    dataset.partition.val = []
    dataset.partition.test = []
    dataset.partition.trainval = []

    dataset.weight_train = []
    dataset.weight_trainval = []

    if new_split is not None:
        # remove Age46-60
        dataset.label_idx.eval.remove(38)  # 54

        train = np.array(new_split.train_idx)
        val = np.array(new_split.val_idx)
        test = np.array(new_split.test_idx)
        trainval = np.concatenate((train, val), axis=0)

        dataset.partition.train = train
        dataset.partition.val = val
        dataset.partition.trainval = trainval
        dataset.partition.test = test

        weight_train = np.mean(dataset.label[train], axis=0).astype(np.float32)
        weight_trainval = np.mean(dataset.label[trainval], axis=0).astype(np.float32)

        dataset.weight_train.append(weight_train)
        dataset.weight_trainval.append(weight_trainval)
        _dump(dataset, os.path.join(save_dir, f'dataset_zs_run{version}.pkl'), protocol)
    else:
        for idx in range(data['partition_attribute'][0][0].shape[1]):              # (range(5))
            train = data['partition_attribute'][0][0][0][idx]['train_index'][0][0][0] - 1
            val = data['partition_attribute'][0][0][0][idx]['val_index'][0][0][0] - 1
            test = data['partition_attribute'][0][0][0][idx]['test_index'][0][0][0] - 1
            trainval = np.concatenate([train, val])
            dataset.partition.train.append(train)
            dataset.partition.val.append(val)
            dataset.partition.test.append(test)
            dataset.partition.trainval.append(trainval)
            weight_train = np.mean(dataset.label[train], axis=0)
            weight_trainval = np.mean(dataset.label[trainval], axis=0)
            dataset.weight_train.append(weight_train)
            dataset.weight_trainval.append(weight_trainval)
        _dump(dataset, os.path.join(save_dir, 'dataset_all.pkl'), protocol)
    return dataset


def _dump(dataset, path, protocol):
    with open(path, 'wb+') as f:
        pickle.dump(dataset, f, protocol)
