#!/usr/bin/env python3
"""Generate tests/fixtures/step_parity: an end-to-end training-step trajectory of the OFFICIAL
SkeletonCLR and 3-view CrosSCLR code (LinguoLi/CrosSCLR), for tests/step_parity.rs.

This file contains no official code. It imports the official model classes (net/skeletonclr.py,
net/crossclr_3views.py, net/st_gcn.py, net/utils/*) and the official augmentations
(feeder/tools.py: temperal_crop, shear) from a checkout given by --official-dir, with the runtime
patches of scripts/bench_official.py (torchlight stub, Tensor.cuda -> identity, the CPU
_dequeue_and_enqueue* patch) and its weights_init (processor/pretrain.py), and drives them as the
official processors' train() loops do (processor/pretrain_skeletonclr.py,
processor/pretrain_crossclr_3views.py):

  torch.manual_seed(seed); model = <official class>(**model_args); model.apply(weights_init)
  model.double(); model.train()            # float64 throughout (the official code runs float32)
  optimizer = SGD(model.parameters(), lr, momentum 0.9, nesterov False, weight_decay 1e-4)
  per step: the processor's loss formulas (SkeletonCLR: CE; CrosSCLR-3 epochs <= cross_epoch:
  CE per view, summed; later epochs: cross=True, topk, context, the masked multi-positive losses,
  (jm+jb)/2, (mj+mb)/2, (bj+bm)/2, mean each, summed), update_ptr, zero_grad, backward, step.

Settings (tiny, so the test runs in seconds on 2 CPU cores): batch 8, T 16 frames, ntu-rgb+d graph
(V 25), M 2 bodies (the second body all-zero in half of the samples, as in NTU), hidden_channels 4,
hidden_dim 32, feature_dim 16, queue 32 (the pointer wraps every 4 steps), key momentum 0.9 (the
EMA visibly matters), temperature 0.07, mlp True, dropout 0 (dropout masks cannot be made identical
across implementations), lr 0.01 constant, SGD momentum 0.9, weight decay 1e-4, nesterov False.
CrosSCLR-3: cross_epoch 6, 2 steps per epoch, 12 phase-1 steps (epochs 1-6) then 12 phase-2 steps
(epochs 7-12; CVC-KM with topk 1, context True). SkeletonCLR (view joint): 24 steps.

Two deliberate departures from the official recipe, so that the trajectory is informative:
  * After weights_init, the projection-head Linear weights (every nn.Linear; biases stay 0) are
    redrawn from N(0, 1/fan_in). With weights_init's N(0, 0.02) heads at this width the head output
    has a norm of ~1e-3, the gradient of the normalised query wrt it scales as 1/norm, and the first
    SGD step at any lr above ~1e-7 makes the last bias dominate: every query and key collapses onto
    one direction (loss = ln(1+K) from step 5, phase-2 top-1 margins ~1e-11, a wrong positive mask
    changes the loss by ~1e-7). Everything else is weights_init: the key encoders are still random
    networks independent of the queries (the official quirk), BN weights N(1, 0.02), biases 0.
  * lr 0.01 instead of 0.1 (0.1 collapses too, even with the redrawn heads).
The SkeletonCLR model starts from the CrosSCLR-3 initial state's joint entries (encoder_q.*,
encoder_k.*, queue, queue_ptr: exactly the SkeletonCLR state-dict names and shapes), loaded with
load_state_dict(strict=True), so one initial state serves both.

Data: 16 base sequences (smooth random trajectories, float32 values), shuffled each epoch
(drop_last), each sample augmented twice per step (x_q, x_k) by the official Feeder_dual._aug:
tools.temperal_crop(x, 6) then tools.shear(x, 0.5), with seeded `random` / `np.random`. The draws
(source frame of each output frame, shear matrix R) are recovered by replaying the seed, checked
against the official output, and stored, so the Rust test rebuilds every batch as
x'[j] = sum_c R[j, c] * base[c, frames] (checked there against stored batch checksums). Both models
see the same batch sequence.

Output (np.savez_compressed):
  init.npz: every entry of the official CrosSCLR-3 state_dict() right after initialisation, under
     its official name (query/key parameters incl. the shared-head duplicate names, BN buffers,
     queues, pointers, the graph buffers `*.A`). Floating tensors are stored as float32: the values
     were drawn in float32 and model.double() widens them exactly (asserted), so the float64 run
     starts from exactly these values.
  data.npz: base (16, 3, 16, 25, 2) float32; idx (S, B) int64 (base sample of each batch row);
     frames (S, 2, B, T) int64 (q / k source frame per output frame); shear (S, 2, B, 3, 3) float64;
     batch_check (S, 2, 2) checksums of x_q, x_k (float64).
  <model>.npz (float64): loss (S, 1 + views) total then per view; ptr (S,) int64 queue pointer
     after the step; checks (S, N, 2) the checksum of every check entry after the step (names in
     meta.json, see below); loss_f32_dev (S, 1 + views) and tensor_f32_dev (S,): how far the official code
     itself, run in float32 (its own precision; same initial state, batches cast to float32 as the
     processor does), is from the float64 run: relative loss difference, and the largest
     per-entry error (tensor_error below) at each step.
  meta.json: settings, per model: views, epoch and phase of each step, check entry names, the smallest
     phase-2 top-1 margin (gap between the largest and second-largest s_u entry), the official
     float32 deviations.

Checksum of a tensor (float64, flat C order): [sum_i x_i (1 + 0.5 cos(0.37 i)), sum_i |x_i|].
Per-tensor error: max |component difference| / max(reference sum |x|, numel * 1e-3).
Check entries: every official state-dict entry except the shared-head duplicate names (the
shared layers once, under encoder_q.fc / encoder_k.fc, as named_parameters() lists them), `*.A`,
num_batches_tracked and queue_ptr*: each parameter and each queue on its own, and per encoder one
entry '<prefix>:bn' for all its batch-norm running_mean / running_var (their checksums summed).

Usage: python3 scripts/make_step_parity_fixture.py --official-dir /path/to/CrosSCLR \
           [--out tests/fixtures/step_parity] [--seed 1] [--official-commit HASH]
"""
import argparse
import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_official as bo  # noqa: E402  (helpers only: torchlight stub, CPU patches, weights_init)

B, T, V, M, C = 8, 16, 25, 2, 3
N_BASE = 16
STEPS = 24
CROSS_EPOCH = 6
STEPS_PER_EPOCH = N_BASE // B
TOPK, CONTEXT = 1, True
LR, SGD_MOMENTUM, NESTEROV, WEIGHT_DECAY = 0.01, 0.9, False, 1e-4
SHEAR, PADDING_RATIO = 0.5, 6
MODEL_ARGS = dict(bo.MODEL_ARGS, feature_dim=16, queue_size=32, momentum=0.9, Temperature=0.07,
                  mlp=True, hidden_channels=4, hidden_dim=32, dropout=0.0)
MODELS = {
    'skeletonclr': dict(cls='net.skeletonclr.SkeletonCLR', views=['joint'], suffixes=['']),
    'crossclr3': dict(cls='net.crossclr_3views.CrosSCLR', views=['joint', 'motion', 'bone'],
                      suffixes=['', '_motion', '_bone']),
}


FLOOR = 1e-3  # the scale floor of tensor_error, per element


def checksum(t):
    """[sum_i x_i * (1 + 0.5 cos(0.37 i)), sum_i |x_i|] of a tensor (float64, flat C order)."""
    x = t.detach().to(torch.float64).reshape(-1)
    w = (torch.arange(x.numel(), dtype=torch.float64) * 0.37).cos() * 0.5 + 1.0
    return [(x * w).sum().item(), x.abs().sum().item()]


def tensor_error(ours, want, numel):
    """The test's per-tensor error: max |difference| of the two checksum components over
    max(sum |x| of the reference, numel * FLOOR) (so (nearly) zero tensors are compared in
    absolute terms)."""
    return max(abs(ours[0] - want[0]), abs(ours[1] - want[1])) / max(want[1], numel * FLOOR)


def check_key(name):
    """The check entry of an official state-dict name: the name itself, '<prefix>:bn' for the
    batch-norm running statistics of encoder <prefix> (one entry: their checksums summed), None for
    what is not checked (`*.A`, num_batches_tracked, queue_ptr*)."""
    prefix, _, rest = name.partition('.')
    if rest == 'A' or name.endswith('num_batches_tracked') or name.startswith('queue_ptr'):
        return None
    if rest.endswith('running_mean') or rest.endswith('running_var'):
        return f'{prefix}:bn'
    return name


def check_entries(names):
    """{entry: [member names]} in sorted entry order (members sorted)."""
    entries = {}
    for n in sorted(names):
        k = check_key(n)
        if k is not None:
            entries.setdefault(k, []).append(n)
    return dict(sorted(entries.items()))


def state_entries(model):
    """Official state-dict entries minus the shared-head duplicates (a shared module's tensors are
    listed once by named_parameters / named_buffers, under the first owner's name)."""
    unique = dict(model.named_parameters())
    unique.update(dict(model.named_buffers()))
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if n in unique}


def make_data(tools, seed):
    """Base sequences and the augmented (x_q, x_k) batch sequence, with the recovered draws."""
    rng = np.random.RandomState(seed)
    base = np.zeros((N_BASE, C, T, V, M), np.float32)
    for n in range(N_BASE):
        bodies = 2 if n % 2 == 0 else 1
        for m in range(bodies):
            offset = rng.randn(C, 1, V) * 0.5
            walk = np.cumsum(rng.randn(C, T, V) * 0.1, axis=1)
            base[n, :, :, :, m] = (offset + walk + rng.randn(C, T, 1) * 0.3).astype(np.float32)
    pad = T // PADDING_RATIO
    order = []
    for epoch in range((STEPS + STEPS_PER_EPOCH - 1) // STEPS_PER_EPOCH):
        order.extend(rng.permutation(N_BASE)[:STEPS_PER_EPOCH * B].tolist())
    idx = np.array(order[:STEPS * B], np.int64).reshape(STEPS, B)
    frames = np.zeros((STEPS, 2, B, T), np.int64)
    shear = np.zeros((STEPS, 2, B, 3, 3))
    xs = np.zeros((STEPS, 2, B, C, T, V, M))
    draw = 0
    for s in range(STEPS):
        for side in range(2):
            for b in range(B):
                x = base[idx[s, b]]
                draw_seed = seed * 100003 + draw
                draw += 1
                random.seed(draw_seed)
                np.random.seed(draw_seed)
                y = tools.shear(tools.temperal_crop(x, PADDING_RATIO), SHEAR)  # Feeder_dual._aug
                # Replay the draws in the official order: np.random.randint (crop), then six
                # random.uniform (shear: s1 x 3, s2 x 3).
                random.seed(draw_seed)
                np.random.seed(draw_seed)
                start = np.random.randint(0, pad * 2 + 1)
                s1 = [random.uniform(-SHEAR, SHEAR) for _ in range(3)]
                s2 = [random.uniform(-SHEAR, SHEAR) for _ in range(3)]
                r = np.array([[1, s1[0], s2[0]], [s1[1], 1, s2[1]], [s1[2], s2[2], 1]])
                padded = list(range(pad))[::-1] + list(range(T)) + list(range(T - pad, T))[::-1]
                src = np.array(padded[start:start + T])
                recon = np.einsum('jc,ctvm->jtvm', r, x[:, src].astype(np.float64))
                assert np.abs(recon - y).max() <= 1e-12 * max(1.0, np.abs(y).max()), 'draw replay'
                frames[s, side, b] = src
                shear[s, side, b] = r
                xs[s, side, b] = y
    batch_check = np.array([[checksum(torch.from_numpy(xs[s, side])) for side in range(2)]
                            for s in range(STEPS)])
    return base, idx, frames, shear, xs, batch_check


def redraw_heads(model):
    """The projection-head Linear weights from N(0, 1/fan_in) (see the module docs), in float32."""
    for _name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            mod.weight.data.normal_(0.0, 1.0 / mod.weight.shape[1] ** 0.5)


def build_model(name, spec, seed, init_state, dtype):
    """The official model, initialised (crossclr3: seed, weights_init, head redraw; skeletonclr:
    the crossclr3 initial state's joint entries, which are exactly the SkeletonCLR state dict)."""
    mod_name, _, cls_name = spec['cls'].rpartition('.')
    cls = getattr(importlib.import_module(mod_name), cls_name)
    bo.patch_for_cpu(cls)
    torch.manual_seed(seed)
    model = cls(**MODEL_ARGS)
    model.apply(bo.weights_init)
    if init_state is None:
        redraw_heads(model)
    else:
        own = model.state_dict()
        model.load_state_dict({n: init_state[n] for n in own}, strict=True)
    model.to(dtype)
    model.train()
    return model


def trajectory(name, spec, xs, seed, init_state, dtype):
    """Runs the official model over the batch sequence in `dtype`; returns per-step records."""
    model = build_model(name, spec, seed, init_state, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=SGD_MOMENTUM,
                                nesterov=NESTEROV, weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss()
    init = {n: t.detach().clone() for n, t in model.state_dict().items()}
    entries = check_entries(state_entries(model))
    names = list(entries)

    def masked(output, mask):
        return - (F.log_softmax(output, dim=1) * mask).sum(1) / mask.sum(1)

    r = dict(init=init, names=names, loss=[], ptr=[], checks=[], numel=[], epochs=[], phases=[],
             margins=[])
    for s in range(STEPS):
        epoch = 1 + s // STEPS_PER_EPOCH
        x_q = torch.from_numpy(xs[s, 0]).to(dtype)  # float32: the processor's data.float()
        x_k = torch.from_numpy(xs[s, 1]).to(dtype)
        if name == 'skeletonclr':
            output, target = model(x_q, x_k)
            model.update_ptr(output.size(0))
            loss = criterion(output, target)
            items = [loss.item()]
            phase = 1
        elif epoch <= CROSS_EPOCH:
            output, output_motion, output_bone, target = model(x_q, x_k)
            model.update_ptr(output.size(0))
            parts = [criterion(output, target), criterion(output_motion, target),
                     criterion(output_bone, target)]
            items = [p.item() for p in parts]
            loss = parts[0] + parts[1] + parts[2]
            phase = 1
        else:
            (o_jm, o_jb, o_mj, o_mb, o_bj, o_bm, m_jm, m_jb, m_mj, m_mb, m_bj, m_bm) = model(
                x_q, x_k, cross=True, topk=TOPK, context=CONTEXT)
            model.update_ptr(o_jm.size(0))
            k = MODEL_ARGS['queue_size']
            for o in (o_jm, o_mj, o_bj):  # s_u = logits[:, 1:1+K] * tau, the top-k input
                top2 = (o[:, 1:1 + k] * MODEL_ARGS['Temperature']).topk(2, dim=1).values
                r['margins'].append((top2[:, 0] - top2[:, 1]).min().item())
            parts = [((masked(o_jm, m_jm) + masked(o_jb, m_jb)) / 2.).mean(),
                     ((masked(o_mj, m_mj) + masked(o_mb, m_mb)) / 2.).mean(),
                     ((masked(o_bj, m_bj) + masked(o_bm, m_bm)) / 2.).mean()]
            items = [p.item() for p in parts]
            loss = parts[0] + parts[1] + parts[2]
            phase = 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        r['loss'].append([loss.item()] + items)
        r['ptr'].append(int(model.queue_ptr[0]))
        e = state_entries(model)
        r['checks'].append([np.sum([checksum(e[m]) for m in members], axis=0).tolist()
                            for members in entries.values()])
        r['numel'] = [sum(e[m].numel() for m in members) for members in entries.values()]
        r['epochs'].append(epoch)
        r['phases'].append(phase)
        print(f'{name} {str(dtype)[6:]} step {s:2d} epoch {epoch:2d} phase {phase}: loss '
              f'{loss.item():.10f} views {["%.6f" % i for i in items]} ptr {r["ptr"][-1]}')
    return r


def run_model(name, spec, xs, seed, init_state=None):
    """The float64 trajectory (recorded) and, for scale, the official float32 run's deviation
    from it (the precision the official code trains in)."""
    r = trajectory(name, spec, xs, seed, init_state, torch.float64)
    f32 = trajectory(name, spec, xs, seed, init_state, torch.float32)
    assert f32['names'] == r['names'] and f32['ptr'] == r['ptr']
    for n, t in r['init'].items():
        assert torch.equal(f32['init'][n].to(t.dtype), t), n
    loss, loss32 = np.array(r['loss']), np.array(f32['loss'])
    loss_dev = np.abs(loss32 - loss) / np.abs(loss)
    tensor_dev = np.array([[tensor_error(o, w, n) for o, w, n in zip(co, cw, r['numel'])]
                           for co, cw in zip(f32['checks'], r['checks'])])
    worst = np.unravel_index(tensor_dev.argmax(), tensor_dev.shape)
    print(f'{name}: official float32 vs float64: losses {loss_dev.max():.2e}, tensors '
          f'{tensor_dev.max():.2e} ({r["names"][worst[1]]} at step {worst[0]})')
    arrays = dict(loss=loss, ptr=np.array(r['ptr'], np.int64), checks=np.array(r['checks']),
                  loss_f32_dev=loss_dev, tensor_f32_dev=tensor_dev.max(axis=1))
    meta = dict(views=spec['views'], epochs=r['epochs'], phases=r['phases'],
                check_names=r['names'], shared_head=name != 'skeletonclr',
                phase2_motion_ema_only=True,
                cross_epoch=CROSS_EPOCH if name != 'skeletonclr' else None,
                topk=TOPK, context=CONTEXT,
                min_top1_margin=min(r['margins']) if r['margins'] else None,
                official_float32_max_loss_dev=loss_dev.max(),
                official_float32_max_tensor_dev=tensor_dev.max())
    return arrays, meta, r['init']


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--official-dir', required=True, help='checkout of LinguoLi/CrosSCLR (the repo root)')
    ap.add_argument('--out', default=os.path.normpath(os.path.join(HERE, '..', 'tests', 'fixtures',
                                                                   'step_parity')))
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--official-commit', default=None,
                    help='commit of the checkout, recorded in meta.json when --official-dir is not a git '
                         'work tree (e.g. a `git archive` export)')
    a = ap.parse_args()
    official = os.path.abspath(a.official_dir)
    for rel in ('net/st_gcn.py', 'net/skeletonclr.py', 'net/crossclr_3views.py', 'feeder/tools.py'):
        if not os.path.isfile(os.path.join(official, rel)):
            sys.exit(f'error: {official} has no {rel} (need a checkout of LinguoLi/CrosSCLR)')
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    sys.path.insert(0, official)
    bo.ensure_torchlight()
    spec = importlib.util.spec_from_file_location('official_feeder_tools',
                                                  os.path.join(official, 'feeder', 'tools.py'))
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)

    base, idx, frames, shear, xs, batch_check = make_data(tools, a.seed)
    os.makedirs(a.out, exist_ok=True)
    np.savez_compressed(os.path.join(a.out, 'data.npz'), base=base, idx=idx, frames=frames,
                        shear=shear, batch_check=batch_check)
    try:
        commit = subprocess.run(['git', '-C', official, 'rev-parse', 'HEAD'], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = a.official_commit
    meta = dict(generator='scripts/make_step_parity_fixture.py', seed=a.seed, official_commit=commit,
                torch=torch.__version__, numpy=np.__version__, dtype='float64', batch=B, frames=T,
                joints=V, bodies=M, base_samples=N_BASE, steps=STEPS, steps_per_epoch=STEPS_PER_EPOCH,
                model_args={k: v for k, v in MODEL_ARGS.items()}, lr=LR, sgd_momentum=SGD_MOMENTUM,
                nesterov=NESTEROV, weight_decay=WEIGHT_DECAY, shear=SHEAR,
                temperal_padding_ratio=PADDING_RATIO,
                checksum='[sum_i x_i (1 + 0.5 cos(0.37 i)), sum_i |x_i|] per tensor (flat C order), '
                         'summed over an entry',
                checksum_floor=FLOOR, models={})
    init_state = None
    for name in ('crossclr3', 'skeletonclr'):
        arrays, m, init = run_model(name, MODELS[name], xs, a.seed, init_state)
        np.savez_compressed(os.path.join(a.out, f'{name}.npz'), **arrays)
        meta['models'][name] = m
        if init_state is None:
            init_state = {n: t.float() if t.is_floating_point() else t for n, t in init.items()}
            for n, t in init.items():  # the float32 copy is exact (drawn in float32, widened)
                assert t.dtype != torch.float64 or torch.equal(init_state[n].double(), t), n
            np.savez_compressed(os.path.join(a.out, 'init.npz'),
                                **{n: t.numpy() for n, t in init_state.items()})
    with open(os.path.join(a.out, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
        f.write('\n')
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f'wrote {a.out} ({total / 1024:.0f} KiB)')


if __name__ == '__main__':
    main()
