#!/usr/bin/env python3
"""Train the OFFICIAL SkeletonCLR (LinguoLi/CrosSCLR) with the scaled small-scale recipe on MSR
Action3D (layout msr20), for a side-by-side comparison with `crossclr pretrain` (issue 14 item 7;
driven by scripts/official_small_scale.sh).

This file contains no official code. It imports the official model classes (net/skeletonclr.py,
net/st_gcn.py, net/utils/graph.py, net/utils/tgcn.py) and the official feeder
(feeder/ntu_feeder.py Feeder_dual, whose _aug is feeder/tools.py temperal_crop then shear) from a
checkout given by --official-dir, with the runtime patches of scripts/bench_official.py
(torchlight stub, Tensor.cuda -> identity, the CPU _dequeue_and_enqueue patch) and its
weights_init (processor/pretrain.py), and drives them as the official SkeletonCLR processor's
train() loop does (processor/pretrain_skeletonclr.py, view 'joint'):

  per step: data1/data2 .float(); output, target = model(data1, data2); model.update_ptr(B);
            loss = CrossEntropyLoss()(output, target); zero_grad; backward; step;
            loss.data.item() appended; epoch mean = np.mean of the epoch's step losses.

Recipe (the one `crossclr pretrain` runs in scripts/official_small_scale.sh):
  model_args: base_encoder net.st_gcn.Model, pretrain True, in_channels 3, hidden_channels 16,
  hidden_dim 256, feature_dim 128 (num_class of the encoders), mlp True, dropout 0.5,
  queue_size 128, momentum 0.995, Temperature 0.07, edge_importance_weighting True,
  graph_args {layout 'msr20', strategy 'spatial'} (max_hop 1, dilation 1: the Graph defaults);
  SGD lr 0.03, momentum 0.9, weight_decay 1e-4, nesterov False, no lr step (adjust_lr keeps
  base_lr when step is empty); batch 16, shuffle True, drop_last True; Feeder_dual with
  shear_amplitude 0.5, temperal_padding_ratio 6; model.apply(weights_init), THEN every encoder_k
  parameter is copied from its encoder_q counterpart (our `independent_key_init: false`; the
  official processor re-draws encoder_k independently through model.apply(weights_init), which
  undoes the copy in SkeletonCLR.__init__); seeds: torch.manual_seed, np.random.seed, random.seed
  (the official init_seed minus the cudnn flags) before the model is built.

Runtime patch 4 (this script): the official Graph.get_edge knows 'openpose', 'ntu-rgb+d' and
'ntu_edge' only. It is wrapped so that layout 'msr20' sets num_node 20, the self links plus the
19 edges of MSR's drawskt.m (1-based, as src/data/layout.rs MSR20_EDGES; checked against that file
when it is found) and centre joint 3 (shoulder centre, 0-based 2); every other layout goes to the
original method. The rest of Graph (hop distances, the max_hop=1 'spatial' partition with its
quirk) is the official code.

Data loading: DataLoader(num_workers=--workers, default 0). With 0 workers the augmentation draws
come from the main process's `random` / `np.random` streams (seeded once), so every epoch draws
fresh augmentations, as `crossclr pretrain` does. The official processor uses worker processes
with worker_init_fn=init_seed (each worker re-seeds with its worker id at every epoch start, so
the augmentation streams repeat each epoch); --workers N with --official-worker-seeding
reproduces that.

Outputs (in --out): model.pt (torch.save(model.state_dict()), the official state-dict names:
encoder_q.*, encoder_k.*, queue, queue_ptr), log.tsv (epoch, mean_loss, seconds, lr), and
summary.json (settings, final loss, total and per-epoch seconds, torch version, threads).

Usage: python3 scripts/official_small_scale.py --official-dir /tmp/official --seed 0 \
           --data /work/exp/msr/train_position.npy --label /work/exp/msr/train_label.pkl \
           --out /tmp/oss/official_s0 [--epochs 20]
"""
import argparse
import importlib
import json
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_official as bo  # noqa: E402  (helpers only: torchlight stub, CPU patches, weights_init)

# MSR Action3D, MSR joint order (src/data/layout.rs MSR20_EDGES, 1-based; centre joint 3).
MSR20_EDGES_1BASED = [(20, 3), (1, 3), (2, 3), (1, 8), (8, 10), (10, 12), (2, 9), (9, 11), (11, 13),
                      (3, 4), (4, 7), (7, 5), (7, 6), (5, 14), (6, 15), (14, 16), (15, 17), (16, 18),
                      (17, 19)]
MSR20_CENTER_1BASED = 3

MODEL_ARGS = dict(base_encoder='net.st_gcn.Model', pretrain=True, feature_dim=128, queue_size=128,
                  momentum=0.995, Temperature=0.07, mlp=True, in_channels=3, hidden_channels=16,
                  hidden_dim=256, num_class=20, dropout=0.5,
                  graph_args={'layout': 'msr20', 'strategy': 'spatial'},
                  edge_importance_weighting=True)
LR, SGD_MOMENTUM, NESTEROV, WEIGHT_DECAY = 0.03, 0.9, False, 1e-4
BATCH, SHEAR, PADDING_RATIO = 16, 0.5, 6


def check_edges_against_ours(repo_root):
    """The msr20 edges above must be those of src/data/layout.rs (when that file is there)."""
    path = os.path.join(repo_root, 'src', 'data', 'layout.rs')
    if not os.path.isfile(path):
        return 'not checked (no src/data/layout.rs)'
    text = open(path).read()
    m = re.search(r'const MSR20_EDGES[^=]*=\s*\[(.*?)\];', text, re.S)
    if not m:
        return 'not checked (MSR20_EDGES not found)'
    ours = [(int(a), int(b)) for a, b in re.findall(r'\((\d+)\s*,\s*(\d+)\)', m.group(1))]
    if ours != MSR20_EDGES_1BASED:
        sys.exit(f'error: msr20 edges differ from {path}: {ours}')
    return 'matches src/data/layout.rs MSR20_EDGES'


def patch_graph_msr20():
    """Runtime patch 4: Graph.get_edge('msr20')."""
    graph_mod = importlib.import_module('net.utils.graph')
    original = graph_mod.Graph.get_edge
    if getattr(original, '_msr20_patch', False):
        return

    def get_edge(self, layout):
        if layout == 'msr20':
            self.num_node = 20
            self_link = [(i, i) for i in range(self.num_node)]
            neighbor_link = [(i - 1, j - 1) for (i, j) in MSR20_EDGES_1BASED]
            self.edge = self_link + neighbor_link
            self.center = MSR20_CENTER_1BASED - 1
        else:
            original(self, layout)

    get_edge._msr20_patch = True
    graph_mod.Graph.get_edge = get_edge


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--official-dir', required=True, help='checkout of LinguoLi/CrosSCLR (the repo root)')
    ap.add_argument('--data', required=True)
    ap.add_argument('--label', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--threads', type=int, default=1, help='torch.set_num_threads')
    ap.add_argument('--workers', type=int, default=0, help='DataLoader workers (0: main process)')
    ap.add_argument('--official-worker-seeding', action='store_true',
                    help='worker_init_fn = the official init_seed (needs --workers >= 1)')
    ap.add_argument('--dropout', type=float, default=MODEL_ARGS['dropout'],
                    help='model_args.dropout (diagnostics; the recipe is 0.5)')
    ap.add_argument('--independent-key-init', action='store_true',
                    help='keep the official independent encoder_k draw (no copy after weights_init)')
    a = ap.parse_args()

    official = os.path.abspath(a.official_dir)
    for rel in ['net/skeletonclr.py', 'net/st_gcn.py', 'net/utils/graph.py', 'feeder/ntu_feeder.py']:
        if not os.path.isfile(os.path.join(official, rel)):
            sys.exit(f'error: {official} has no {rel} (need a checkout of LinguoLi/CrosSCLR)')
    torch.set_num_threads(a.threads)
    edge_check = check_edges_against_ours(os.path.dirname(HERE))
    sys.path.insert(0, official)
    bo.ensure_torchlight()
    patch_graph_msr20()
    skeletonclr = importlib.import_module('net.skeletonclr')
    bo.patch_for_cpu(skeletonclr.SkeletonCLR)
    feeder_mod = importlib.import_module('feeder.ntu_feeder')

    MODEL_ARGS['dropout'] = a.dropout
    seed_all(a.seed)
    model = skeletonclr.SkeletonCLR(**MODEL_ARGS)
    model.apply(bo.weights_init)  # processor/pretrain.py load_model
    if not a.independent_key_init:
        with torch.no_grad():
            for param_q, param_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
                param_k.data.copy_(param_q.data)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=SGD_MOMENTUM, nesterov=NESTEROV,
                                weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss()

    feeder = feeder_mod.Feeder_dual(a.data, a.label, shear_amplitude=SHEAR,
                                    temperal_padding_ratio=PADDING_RATIO, mmap=True)
    init_fn = None
    if a.official_worker_seeding:
        if a.workers < 1:
            sys.exit('error: --official-worker-seeding needs --workers >= 1')
        init_fn = seed_all  # what processor/processor.py init_seed does on CPU: seed = worker id
    loader = torch.utils.data.DataLoader(feeder, batch_size=BATCH, shuffle=True, pin_memory=False,
                                         num_workers=a.workers, drop_last=True, worker_init_fn=init_fn)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'official SkeletonCLR (joint) on {len(feeder)} samples, {len(loader)} steps/epoch, '
          f'{n_params} trainable parameters, A {tuple(model.encoder_q.A.shape)}, seed {a.seed}, '
          f'threads {torch.get_num_threads()}; msr20 edges {edge_check}', flush=True)

    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, 'log.tsv'), 'w')
    log.write('epoch\tmean_loss\tseconds\tlr\n')
    epochs = []
    t_all = time.perf_counter()
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        loss_value = []
        for [data1, data2], _label in loader:
            data1 = data1.float()
            data2 = data2.float()
            output, target = model(data1, data2)
            model.update_ptr(output.size(0))
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value.append(loss.data.item())
        sec = time.perf_counter() - t0
        mean = float(np.mean(loss_value))
        epochs.append(dict(epoch=epoch, mean_loss=mean, seconds=sec))
        log.write(f'{epoch}\t{mean:.6f}\t{sec:.3f}\t{LR}\n')
        log.flush()
        print(f'epoch {epoch}: mean loss {mean:.4f}, {sec:.1f} s ({len(loss_value) * BATCH / sec:.1f} samples/s)',
              flush=True)
    total = time.perf_counter() - t_all
    log.close()
    torch.save(model.state_dict(), os.path.join(a.out, 'model.pt'))
    summary = dict(script='scripts/official_small_scale.py', seed=a.seed, epochs=a.epochs,
                   model_args=MODEL_ARGS, lr=LR, sgd_momentum=SGD_MOMENTUM, nesterov=NESTEROV,
                   weight_decay=WEIGHT_DECAY, batch=BATCH, shear=SHEAR, padding_ratio=PADDING_RATIO,
                   key_init='independent (official)' if a.independent_key_init else 'copy of encoder_q',
                   workers=a.workers, official_worker_seeding=a.official_worker_seeding,
                   steps_per_epoch=len(loader), final_loss=epochs[-1]['mean_loss'] if epochs else None,
                   seconds=total, seconds_per_epoch=total / max(1, a.epochs), epochs_log=epochs,
                   torch=torch.__version__, threads=torch.get_num_threads(), msr20_edges=edge_check)
    with open(os.path.join(a.out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'done: final loss {summary["final_loss"]:.4f}, {total:.1f} s; {a.out}/model.pt', flush=True)


if __name__ == '__main__':
    main()
