#!/usr/bin/env python3
"""PyTorch baseline for `crossclr bench`: one pre-training step of SkeletonCLR / CrosSCLR timed the
way the official code runs it.

This is an independent re-implementation written from docs/crossclr-reference.md (sections 2, 4-7),
not the official code: the 1/4-width ST-GCN (official graph with the max_hop=1 partition quirk,
data_bn over 75 channels, 10 blocks, dropout 0.5 in blocks 2-10, mean over bodies), the MoCo
SkeletonCLR step, and CrosSCLR 2-view / 3-view phase 1 (three MoCos, EMA joint -> motion -> bone,
shared projection-head quirk) and phase 2 (CVC-KM: top-1 mined in the other view, context block
s_u * s_v, multi-positive mean log-probability, 1/2 average per view for 3 views, motion-only EMA).
Like the official processor, each step does views -> queries -> EMA -> keys -> logits -> enqueue
with a host-read pointer -> loss -> zero_grad -> backward -> SGD(0.9, wd 1e-4) -> loss.item().

Usage:
  python3 scripts/pytorch_baseline.py --model skeletonclr|crossclr2|crossclr3 --phase 1|2 \
      --batch 128 --device cpu|cuda --mode eager|tuned [--warmup 3 --iters 20] --json
`tuned` = torch.backends.cudnn.benchmark + TF32 for cuBLAS and cuDNN.
`--profile trace.json [--profile-steps 5]`: after the timed steps, records more steps with torch.profiler
(Chrome trace + a key_averages table in trace.json.txt) without changing the reported timings.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Graph (NTU RGB+D, 25 joints, 1-based lists from the reference, section 4.1)
EDGES = [(1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10),
         (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19),
         (22, 23), (23, 8), (24, 25), (25, 12)]
# Directed (source -> destination) entries of the "close" and "further" partitions (max_hop=1 quirk).
A1_EDGES = [(1, 2), (1, 13), (1, 17), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (6, 7), (7, 6), (7, 8),
            (8, 7), (8, 23), (9, 21), (10, 9), (10, 11), (11, 10), (11, 12), (12, 11), (12, 25), (13, 1),
            (13, 14), (14, 13), (14, 15), (15, 14), (15, 16), (16, 15), (17, 1), (17, 18), (18, 17),
            (18, 19), (19, 18), (19, 20), (20, 19), (22, 23), (23, 8), (23, 22), (24, 25), (25, 12),
            (25, 24)]
A2_EDGES = [(2, 1), (3, 4), (5, 6), (9, 10), (21, 2), (21, 3), (21, 5), (21, 9)]
# Bone pairs (v, parent(v)), 1-based; joint 21's bone is zero.
BONES = [(1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10),
         (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (21, 21),
         (22, 23), (23, 8), (24, 25), (25, 12)]
V = 25


def graph_a():
    """(3, V, V) float32, A[k][source][destination] = 1 / deg(destination) (deg counts the self-loop)."""
    deg = [1] * V
    for a, b in EDGES:
        deg[a - 1] += 1
        deg[b - 1] += 1
    A = torch.zeros(3, V, V)
    for i in range(V):
        A[0, i, i] = 1.0 / deg[i]
    for k, edges in ((1, A1_EDGES), (2, A2_EDGES)):
        for s, d in edges:
            A[k, s - 1, d - 1] = 1.0 / deg[d - 1]
    assert torch.allclose(A.sum(0).sum(0), torch.ones(V)), "partition columns must sum to 1"
    return A


# ---------------------------------------------------------------------------------------------
# ST-GCN (reference section 4)
class GraphConv(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.k = k
        self.conv = nn.Conv2d(cin, cout * k, kernel_size=(1, 1))

    def forward(self, x, A):
        x = self.conv(x)
        n, kc, t, v = x.size()
        x = x.view(n, self.k, kc // self.k, t, v)
        return torch.einsum('nkctv,kvw->nctw', (x, A)).contiguous()


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1, dropout=0.0, residual=True, k=3, tk=9):
        super().__init__()
        self.gcn = GraphConv(cin, cout, k)
        self.tcn = nn.Sequential(
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, (tk, 1), (stride, 1), ((tk - 1) // 2, 0)),
            nn.BatchNorm2d(cout), nn.Dropout(dropout, inplace=True))
        if not residual:
            self.residual = lambda x: 0
        elif cin == cout and stride == 1:
            self.residual = lambda x: x
        else:
            self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1, (stride, 1)), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, A):
        res = self.residual(x)
        x = self.gcn(x, A)
        return self.relu(self.tcn(x) + res)


class StGcn(nn.Module):
    def __init__(self, in_channels=3, hidden=16, hidden_dim=256, num_class=128, dropout=0.5):
        super().__init__()
        self.register_buffer('A', graph_a())
        self.data_bn = nn.BatchNorm1d(in_channels * V)
        h = hidden
        cfg = [(in_channels, h, 1, False), (h, h, 1, True), (h, h, 1, True), (h, h, 1, True),
               (h, 2 * h, 2, True), (2 * h, 2 * h, 1, True), (2 * h, 2 * h, 1, True),
               (2 * h, 4 * h, 2, True), (4 * h, 4 * h, 1, True), (4 * h, hidden_dim, 1, True)]
        self.st_gcn_networks = nn.ModuleList(
            Block(ci, co, s, dropout if i > 0 else 0.0, residual=r) for i, (ci, co, s, r) in enumerate(cfg))
        self.edge_importance = nn.ParameterList(nn.Parameter(torch.ones(self.A.size())) for _ in cfg)
        self.fc = nn.Linear(hidden_dim, num_class)

    def forward(self, x):
        N, C, T, Vv, M = x.size()
        x = x.permute(0, 4, 3, 1, 2).contiguous().view(N * M, Vv * C, T)
        x = self.data_bn(x)
        x = x.view(N, M, Vv, C, T).permute(0, 1, 3, 4, 2).contiguous().view(N * M, C, T, Vv)
        for block, imp in zip(self.st_gcn_networks, self.edge_importance):
            x = block(x, self.A * imp)
        x = F.avg_pool2d(x, x.size()[2:])
        x = x.view(N, M, -1).mean(dim=1)
        return self.fc(x)


def weights_init(m):
    """Official init: Conv1d/Conv2d/Linear weights N(0, 0.02), biases 0; BatchNorm weights N(1, 0.02)."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        m.weight.data.normal_(0.0, 0.02)
        if m.bias is not None:
            m.bias.data.fill_(0)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        m.weight.data.normal_(1.0, 0.02)
        m.bias.data.fill_(0)


# ---------------------------------------------------------------------------------------------
# Views (reference section 2): written like the official model, slice assignments included.
def motion(x):
    m = torch.zeros_like(x)
    m[:, :, :-1] = x[:, :, 1:] - x[:, :, :-1]
    return m


def bone(x):
    b = torch.zeros_like(x)
    for v1, v2 in BONES:
        b[:, :, :, v1 - 1] = x[:, :, :, v1 - 1] - x[:, :, :, v2 - 1]
    return b


VIEW_FN = {'joint': lambda x: x, 'motion': motion, 'bone': bone}


# ---------------------------------------------------------------------------------------------
# Multi-view MoCo (SkeletonCLR = one view; CrosSCLR = 2 or 3 views with the shared head quirk)
class MultiMoCo(nn.Module):
    def __init__(self, views, K=32768, m=0.999, T=0.07, dim=128):
        super().__init__()
        self.views, self.K, self.m, self.T = views, K, m, T
        self.enc_q = nn.ModuleList(StGcn(num_class=dim) for _ in views)
        self.enc_k = nn.ModuleList(StGcn(num_class=dim) for _ in views)
        hidden = self.enc_q[0].fc.weight.shape[1]
        # Joint head: Linear -> ReLU -> (original) Linear. Motion/bone heads wrap the joint MLP
        # object itself (the official shared-head quirk), on both sides.
        for enc in (self.enc_q, self.enc_k):
            enc[0].fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), enc[0].fc)
            for i in range(1, len(views)):
                enc[i].fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), enc[0].fc)
        for q, k in zip(self.enc_q, self.enc_k):
            for pq, pk in zip(q.parameters(), k.parameters()):
                pk.data.copy_(pq.data)
                pk.requires_grad = False
        for i in range(len(views)):
            self.register_buffer(f'queue{i}', F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

    def queue(self, i):
        return getattr(self, f'queue{i}')

    @torch.no_grad()
    def ema(self, i):
        for pq, pk in zip(self.enc_q[i].parameters(), self.enc_k[i].parameters()):
            pk.data = pk.data * self.m + pq.data * (1.0 - self.m)

    @torch.no_grad()
    def enqueue(self, keys):
        ptr = int(self.queue_ptr)  # host read, as the official code does
        for i, k in enumerate(keys):
            self.queue(i)[:, ptr:ptr + k.shape[0]] = k.T

    def update_ptr(self, b):
        self.queue_ptr[0] = (self.queue_ptr[0] + b) % self.K

    def forward(self, x_q, x_k, cross=False):
        xq = [VIEW_FN[v](x_q) for v in self.views]
        xk = [VIEW_FN[v](x_k) for v in self.views]
        q = [F.normalize(self.enc_q[i](xq[i]), dim=1) for i in range(len(self.views))]
        with torch.no_grad():
            if cross:
                self.ema(self.views.index('motion'))
            else:
                for i in range(len(self.views)):
                    self.ema(i)
            k = [F.normalize(self.enc_k[i](xk[i]), dim=1) for i in range(len(self.views))]
        l_pos = [torch.einsum('nc,nc->n', [q[i], k[i]]).unsqueeze(-1) for i in range(len(q))]
        l_neg = [torch.einsum('nc,ck->nk', [q[i], self.queue(i).clone().detach()]) for i in range(len(q))]
        if not cross:
            logits = [torch.cat([l_pos[i], l_neg[i]], dim=1) / self.T for i in range(len(q))]
            labels = torch.zeros(logits[0].shape[0], dtype=torch.long, device=x_q.device)
            self.enqueue(k)
            return sum(F.cross_entropy(lg, labels) for lg in logits)
        # CVC-KM (phase 2)
        n = len(q)
        topk = [torch.topk(l_neg[i], 1, dim=1)[1] for i in range(n)]
        losses = []
        for u in range(n):
            per = []
            for v in range(n):
                if v == u:
                    continue
                ctx = torch.einsum('nk,nk->nk', [l_neg[u], l_neg[v]])
                logits = torch.cat([l_pos[u], l_neg[u], ctx], dim=1) / self.T
                onehot = torch.zeros_like(l_neg[u])
                onehot.scatter_(1, topk[v], 1)
                mask = torch.cat([torch.ones(onehot.size(0), 1, device=onehot.device), onehot, onehot], dim=1)
                per.append((-(F.log_softmax(logits, dim=1) * mask).sum(1) / mask.sum(1)).mean())
            losses.append(sum(per) / len(per) if n > 2 else sum(per))
        self.enqueue(k)
        return sum(losses)


MODELS = {'skeletonclr': ['joint'], 'crossclr2': ['joint', 'motion'], 'crossclr3': ['joint', 'motion', 'bone']}


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Rows of the --profile table, and the width of its name column (CUDA kernel names are long).
PROFILE_TOP = 30
PROFILE_NAME_WIDTH = 100


def write_atomic_text(path, text):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def profile_steps(a, dev, step, sync):
    """Runs a.profile_steps steps under torch.profiler; writes the Chrome trace to a.profile and the
    key_averages table to a.profile + '.txt' (both atomically)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU]
    if dev.type == 'cuda':
        activities.append(ProfilerActivity.CUDA)
    sync()
    # acc_events: one cycle anyway; it only silences torch 2.11's "clears events" warning.
    with profile(activities=activities, acc_events=True) as prof:
        for i in range(a.profile_steps):
            with record_function('train_step'):
                step(i)
        sync()
    tmp = a.profile + '.tmp'
    prof.export_chrome_trace(tmp)
    if not os.path.exists(tmp):
        sys.exit(f'error: torch.profiler did not write {tmp}')
    os.replace(tmp, a.profile)
    sort_by = 'self_device_time_total' if dev.type == 'cuda' else 'self_cpu_time_total'
    table = prof.key_averages().table(sort_by=sort_by, row_limit=PROFILE_TOP,
                                      max_name_column_width=PROFILE_NAME_WIDTH)
    header = (f'# pytorch {torch.__version__} {a.model} phase {a.phase} batch {a.batch} frames {a.frames} '
              f'on {dev} ({a.mode}): totals over {a.profile_steps} profiled steps, sorted by {sort_by}\n')
    write_atomic_text(a.profile + '.txt', header + table + '\n')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', choices=sorted(MODELS), default='skeletonclr')
    ap.add_argument('--phase', type=int, choices=[1, 2], default=1)
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--frames', type=int, default=50)
    ap.add_argument('--queue-size', type=int, default=32768)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--mode', choices=['eager', 'tuned'], default='eager')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--iters', type=int, default=20)
    ap.add_argument('--inputs', type=int, default=4, help='distinct random batches to rotate through')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--json', action='store_true')
    ap.add_argument('--profile', metavar='PATH',
                    help='after the timed steps, profile --profile-steps more steps with torch.profiler (CPU + '
                         'CUDA activities): Chrome trace to PATH, key_averages table (top 30 by self device '
                         'time, or self CPU time on CPU) to PATH.txt. The timings above stay unprofiled.')
    ap.add_argument('--profile-steps', type=int, default=5, help='steps recorded by --profile')
    a = ap.parse_args()
    if a.phase == 2 and a.model == 'skeletonclr':
        ap.error('SkeletonCLR has no phase 2')
    if a.queue_size % a.batch:
        ap.error('--queue-size must be divisible by --batch')
    if a.profile is not None and a.profile_steps < 1:
        ap.error('--profile-steps must be at least 1')
    if a.profile is not None and not os.path.isdir(os.path.dirname(os.path.abspath(a.profile))):
        ap.error(f'--profile: the folder of {a.profile} does not exist')
    dev = torch.device(a.device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: CUDA requested but torch sees no GPU')
    if a.mode == 'tuned':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(a.seed)
    model = MultiMoCo(MODELS[a.model], K=a.queue_size)
    model.apply(weights_init)  # after construction: key encoders re-initialised independently
    model = model.to(dev)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          nesterov=False, weight_decay=1e-4)
    shape = (a.batch, 3, a.frames, V, 2)
    batches = [(torch.randn(shape, device=dev), torch.randn(shape, device=dev)) for _ in range(a.inputs)]
    cross = a.phase == 2

    def sync():
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)

    def step(i):
        x_q, x_k = batches[i % len(batches)]
        loss = model(x_q, x_k, cross=cross)
        model.update_ptr(a.batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.data.item()  # the official processor logs every step's loss

    losses = []
    for i in range(a.warmup):
        losses.append(step(i))
    sync()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(a.iters):
        sync()
        t0 = time.perf_counter()
        losses.append(step(a.warmup + i))
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if a.profile is not None:
        # After the timed steps, so that the profiler's overhead does not touch the timings.
        first = a.warmup + a.iters
        profile_steps(a, dev, lambda i: step(first + i), sync)
    peak_reserved = None
    if dev.type == 'cuda':
        peak, peak_kind = torch.cuda.max_memory_allocated(dev), 'cuda_max_memory_allocated'
        peak_reserved = torch.cuda.max_memory_reserved(dev)
        name = torch.cuda.get_device_name(dev)
    else:
        peak, peak_kind = peak_rss_bytes(), 'process_peak_rss'
        name = 'cpu: ' + next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')
        name += f' ({torch.get_num_threads()} threads)'
    med = statistics.median(times)
    out = {
        'impl': 'pytorch', 'torch': torch.__version__, 'model': a.model, 'phase': a.phase, 'batch': a.batch,
        'frames': a.frames, 'queue_size': a.queue_size, 'device': a.device, 'device_name': name,
        'mode': a.mode, 'graph': False, 'tf32': a.mode == 'tuned', 'cudnn_benchmark': a.mode == 'tuned',
        'warmup': a.warmup, 'iters': a.iters, 'ms_median': med, 'ms_min': min(times),
        'ms_mean': statistics.fmean(times), 'samples_per_s': a.batch * 1e3 / med, 'peak_bytes': peak,
        'peak_reserved_bytes': peak_reserved, 'peak_kind': peak_kind, 'loss_first': losses[0], 'loss_last': losses[-1],
    }
    if a.profile is not None:
        out['profile'] = a.profile
        out['profile_steps'] = a.profile_steps
    if a.json:
        print(json.dumps(out))
    else:
        print(f"pytorch {a.model} phase {a.phase} batch {a.batch} on {name} ({a.mode}): "
              f"{med:.2f} ms/step median, {min(times):.2f} min, {out['samples_per_s']:.1f} samples/s, "
              f"peak {peak / 2**20:.1f} MiB ({peak_kind}); loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == '__main__':
    main()
