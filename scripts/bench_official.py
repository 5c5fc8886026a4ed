#!/usr/bin/env python3
"""Time one pre-training step of the OFFICIAL CrosSCLR / SkeletonCLR PyTorch code (LinguoLi/CrosSCLR).

This file contains no official code: it imports the official model classes from a checkout given by
--official-dir (needs net/st_gcn.py, net/skeletonclr.py, net/crossclr_3views.py, net/utils/graph.py,
net/utils/tgcn.py) and drives them the way the official processors' train() loops do for one batch
(processor/pretrain_skeletonclr.py, processor/pretrain_crossclr_3views.py, processor/pretrain.py):

  model = <official class>(**model_args of config/CrosSCLR/crossclr_3views_xview.yaml)
  model.apply(weights_init)                 # processor/pretrain.py: conv/linear N(0,.02), BN N(1,.02)
  optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4)
  per step:
    skeletonclr (view 'joint'): output, target = model(x1, x2); model.update_ptr(B);
        loss = CrossEntropyLoss()(output, target); loss.data.item()
    crossclr3 phase 1: output, output_motion, output_bone, target = model(x1, x2); update_ptr(B);
        three CrossEntropyLoss values, .data.item() on each, loss = their sum
    crossclr3 phase 2: 12 outputs = model(x1, x2, cross=True, topk=1, context=True); update_ptr(B);
        six masked multi-positive losses, (jm+jb)/2, (mj+mb)/2, (bj+bm)/2, .mean() each,
        .data.item() on each, loss = their sum
    then optimizer.zero_grad(); loss.backward(); optimizer.step()
The motion / bone views of CrosSCLR-3 are built inside the official model from the joint input.
Not timed (as in scripts/pytorch_baseline.py): data loading / augmentation, the host->device copy,
tensorboard / log writing. The reported loss_first / loss_last are the summed step losses (for
crossclr3 the sum of the three .item() values the processor reads; no extra host sync is added).
The SkeletonCLR repo ships no SkeletonCLR yaml; it uses the same model_args / optimiser as the 3-view
yaml (in_channels 3, hidden_channels 16, hidden_dim 256, num_class 60, dropout 0.5, ntu-rgb+d /
spatial graph, edge importance on, feature_dim 128, queue 32768, momentum 0.999, T 0.07, mlp on).

Runtime patches (the official files are NOT edited):
  1. torchlight: only `import_class` is used by the model files. If `import torchlight` fails or lacks
     import_class (a raw checkout has it in torchlight/torchlight/, installed by setup.py), a stub
     module `torchlight` with the same import_class (rpartition + __import__ + getattr) is put in
     sys.modules.
  2. --device cpu only: torch.Tensor.cuda is replaced by a function returning the tensor unchanged
     (the official model calls .cuda() on the CE labels and on the ones-column of the phase-2 masks).
  3. --device cpu only: the official _dequeue_and_enqueue* methods compute
     `gpu_index = keys.device.index`, which is None for a CPU tensor (TypeError). Each method is
     wrapped so that the ORIGINAL body runs with a stand-in for `keys` exposing the same .shape and
     .T and a device whose index is 0 (what a single-GPU run sees); the slice assignment into the
     queue is the official one.
  No patch is needed on CUDA (the model runs on cuda:0 there, as in the official single-GPU setup).
--mode official (default) applies main.py's init_seed settings (cudnn.deterministic=True,
cudnn.benchmark=False); eager = torch defaults; tuned = cudnn.benchmark + TF32 (as the baseline).

Usage:
  python3 scripts/bench_official.py --official-dir /path/to/CrosSCLR --model skeletonclr|crossclr3 \
      --phase 1|2 --batch 128 --device cpu|cuda [--warmup 3 --iters 20] [--mode official] --json
Output fields match scripts/pytorch_baseline.py (impl = "official").
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

V = 25  # NTU RGB+D joints
MODEL_CLASS = {'skeletonclr': 'net.skeletonclr.SkeletonCLR', 'crossclr3': 'net.crossclr_3views.CrosSCLR'}
# model_args of the official config/CrosSCLR/crossclr_3views_xview.yaml
MODEL_ARGS = dict(base_encoder='net.st_gcn.Model', pretrain=True, feature_dim=128, queue_size=32768,
                  momentum=0.999, Temperature=0.07, mlp=True, in_channels=3, hidden_channels=16,
                  hidden_dim=256, num_class=60, dropout=0.5,
                  graph_args={'layout': 'ntu-rgb+d', 'strategy': 'spatial'},
                  edge_importance_weighting=True)
# optimiser of the same yaml + processor/pretrain.py load_optimizer (momentum fixed at 0.9 there)
BASE_LR, MOMENTUM, NESTEROV, WEIGHT_DECAY = 0.1, 0.9, False, 1e-4
TOPK, CONTEXT = 1, True  # yaml: topk 1, context True (phase 2 arguments the processor passes)


def ensure_torchlight():
    """Runtime patch 1: provide torchlight.import_class if the real package is not installed."""
    try:
        import torchlight  # noqa: F401
        if hasattr(torchlight, 'import_class'):
            return 'real'
    except ImportError:
        pass

    def import_class(import_str):
        mod_str, _sep, class_str = import_str.rpartition('.')
        __import__(mod_str)
        try:
            return getattr(sys.modules[mod_str], class_str)
        except AttributeError:
            raise ImportError('Class %s cannot be found (%s)' %
                              (class_str, traceback.format_exception(*sys.exc_info())))

    stub = types.ModuleType('torchlight')
    stub.import_class = import_class
    sys.modules['torchlight'] = stub
    return 'stub'


class _KeysAtIndex0:
    """Stand-in for the `keys` argument of the official _dequeue_and_enqueue*: same shape and .T,
    device.index = 0 (runtime patch 3)."""

    def __init__(self, keys):
        self.shape = keys.shape
        self.T = keys.T
        self.device = types.SimpleNamespace(index=0, type=keys.device.type)


def patch_for_cpu(cls):
    """Runtime patches 2 and 3 (CPU only)."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    for name in [n for n in dir(cls) if n.startswith('_dequeue_and_enqueue')]:
        original = getattr(cls, name)

        def wrapped(self, keys, _original=original):
            return _original(self, _KeysAtIndex0(keys) if keys.device.index is None else keys)

        setattr(cls, name, wrapped)


def weights_init(m):
    """processor/pretrain.py weights_init, matched on the class name as the official code does."""
    classname = m.__class__.__name__
    if classname.find('Conv1d') != -1 or classname.find('Conv2d') != -1 or classname.find('Linear') != -1:
        m.weight.data.normal_(0.0, 0.02)
        if m.bias is not None:
            m.bias.data.fill_(0)
    elif classname.find('BatchNorm') != -1:
        m.weight.data.normal_(1.0, 0.02)
        m.bias.data.fill_(0)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_step(model, model_name, phase, criterion, optimizer):
    """One iteration of the official processor's train() loop body (statistics writing excluded)."""

    def skeletonclr_step(data1, data2):
        output, target = model(data1, data2)
        model.update_ptr(output.size(0))
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.data.item()

    def crossclr3_phase1_step(data1, data2):
        output, output_motion, output_bone, target = model(data1, data2)
        model.update_ptr(output.size(0))
        loss = criterion(output, target)
        loss_motion = criterion(output_motion, target)
        loss_bone = criterion(output_bone, target)
        items = [loss.data.item(), loss_motion.data.item(), loss_bone.data.item()]
        loss = loss + loss_motion + loss_bone
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return sum(items)

    def crossclr3_phase2_step(data1, data2):
        (output_jm, output_jb, output_mj, output_mb, output_bj, output_bm,
         mask_jm, mask_jb, mask_mj, mask_mb, mask_bj, mask_bm) = model(data1, data2, cross=True,
                                                                        topk=TOPK, context=CONTEXT)
        model.update_ptr(output_jm.size(0))

        def masked(output, mask):
            return - (F.log_softmax(output, dim=1) * mask).sum(1) / mask.sum(1)

        loss = ((masked(output_jm, mask_jm) + masked(output_jb, mask_jb)) / 2.).mean()
        loss_motion = ((masked(output_mj, mask_mj) + masked(output_mb, mask_mb)) / 2.).mean()
        loss_bone = ((masked(output_bj, mask_bj) + masked(output_bm, mask_bm)) / 2.).mean()
        items = [loss.data.item(), loss_motion.data.item(), loss_bone.data.item()]
        loss = loss + loss_motion + loss_bone
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return sum(items)

    if model_name == 'skeletonclr':
        return skeletonclr_step
    return crossclr3_phase1_step if phase == 1 else crossclr3_phase2_step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--official-dir', required=True, help='checkout of LinguoLi/CrosSCLR (the repo root)')
    ap.add_argument('--model', choices=sorted(MODEL_CLASS), default='skeletonclr')
    ap.add_argument('--phase', type=int, choices=[1, 2], default=1)
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--frames', type=int, default=50)
    ap.add_argument('--queue-size', type=int, default=MODEL_ARGS['queue_size'])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--mode', choices=['official', 'eager', 'tuned'], default='official')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--iters', type=int, default=20)
    ap.add_argument('--inputs', type=int, default=4, help='distinct random batches to rotate through')
    ap.add_argument('--seed', type=int, default=0, help='main.py calls init_seed(0)')
    ap.add_argument('--json', action='store_true')
    a = ap.parse_args()
    if a.phase == 2 and a.model == 'skeletonclr':
        ap.error('SkeletonCLR has no phase 2 (the official class has no cross_training)')
    if a.queue_size % a.batch:
        ap.error('--queue-size must be divisible by --batch (official update_ptr asserts it)')
    official = os.path.abspath(a.official_dir)
    for rel in ('net/st_gcn.py', 'net/utils/graph.py', 'net/utils/tgcn.py',
                MODEL_CLASS[a.model].rpartition('.')[0].replace('.', '/') + '.py'):
        if not os.path.isfile(os.path.join(official, rel)):
            sys.exit(f'error: {official} has no {rel} (need a checkout of LinguoLi/CrosSCLR)')
    dev = torch.device(a.device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            sys.exit('error: CUDA requested but torch sees no GPU')
        dev = torch.device('cuda', torch.cuda.current_device())  # .cuda() in the model = current device
    if a.mode == 'official':  # processor/processor.py init_seed (called by main.py)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif a.mode == 'tuned':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    sys.path.insert(0, official)
    torchlight_kind = ensure_torchlight()
    import importlib
    mod_name, _, cls_name = MODEL_CLASS[a.model].rpartition('.')
    cls = getattr(importlib.import_module(mod_name), cls_name)
    patches = ['torchlight stub'] if torchlight_kind == 'stub' else []
    if dev.type == 'cpu':
        patch_for_cpu(cls)
        patches += ['Tensor.cuda -> identity', '_dequeue_and_enqueue* keys.device.index None -> 0']

    torch.manual_seed(a.seed)
    model = cls(**dict(MODEL_ARGS, queue_size=a.queue_size))
    model.apply(weights_init)
    model = model.to(dev)
    model.train()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM, nesterov=NESTEROV,
                                weight_decay=WEIGHT_DECAY)
    step = make_step(model, a.model, a.phase, criterion, optimizer)
    shape = (a.batch, 3, a.frames, V, 2)
    batches = [(torch.randn(shape, device=dev), torch.randn(shape, device=dev)) for _ in range(a.inputs)]

    def sync():
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)

    losses = []
    for i in range(a.warmup):
        losses.append(step(*batches[i % len(batches)]))
    sync()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(a.iters):
        sync()
        t0 = time.perf_counter()
        losses.append(step(*batches[(a.warmup + i) % len(batches)]))
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak_reserved = None
    if dev.type == 'cuda':
        peak, peak_kind = torch.cuda.max_memory_allocated(dev), 'cuda_max_memory_allocated'
        peak_reserved = torch.cuda.max_memory_reserved(dev)
        name = torch.cuda.get_device_name(dev)
    else:
        peak, peak_kind = peak_rss_bytes(), 'process_peak_rss'
        name = 'cpu: ' + next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
                               if l.startswith('model name')), '?')
        name += f' ({torch.get_num_threads()} threads)'
    med = statistics.median(times)
    out = {
        'impl': 'official', 'torch': torch.__version__, 'model': a.model, 'phase': a.phase, 'batch': a.batch,
        'frames': a.frames, 'queue_size': a.queue_size, 'device': a.device, 'device_name': name,
        'mode': a.mode, 'graph': False, 'tf32': a.mode == 'tuned', 'cudnn_benchmark': a.mode == 'tuned',
        'cudnn_deterministic': a.mode == 'official', 'runtime_patches': patches,
        'warmup': a.warmup, 'iters': a.iters, 'ms_median': med, 'ms_min': min(times),
        'ms_mean': statistics.fmean(times), 'samples_per_s': a.batch * 1e3 / med, 'peak_bytes': peak,
        'peak_reserved_bytes': peak_reserved, 'peak_kind': peak_kind, 'loss_first': losses[0],
        'loss_last': losses[-1],
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"official {a.model} phase {a.phase} batch {a.batch} on {name} ({a.mode}): "
              f"{med:.2f} ms/step median, {min(times):.2f} min, {out['samples_per_s']:.1f} samples/s, "
              f"peak {peak / 2**20:.1f} MiB ({peak_kind}); loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
              f"patches: {', '.join(patches) or 'none'}")


if __name__ == '__main__':
    main()
