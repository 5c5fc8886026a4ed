#!/usr/bin/env python3
"""Per-kernel summary of Kineto Chrome traces (from `crossclr bench --profile` or from
`scripts/pytorch_baseline.py --profile`), and a side-by-side comparison of two of them.

Usage:
  python3 scripts/profile_summary.py TRACE.json --steps N [--top 30] [--cat kernel,gpu_memcpy,gpu_memset]
  python3 scripts/profile_summary.py CROSSCLR.json PYTORCH.json --steps N M [--top 30]

Events of the chosen categories (default: the device's work: kernels, copies, memsets) are grouped by
name; times are per step (the total divided by the steps the trace covers). `--cat cpu_op` lists
ATen ops instead (their total time, children included). Kernel names are shortened (no parameter
list, nested template arguments as <...>); --full-names keeps them whole. Standard library only.
"""
import argparse
import json
import sys
from collections import defaultdict

DEVICE_WORK = 'kernel,gpu_memcpy,gpu_memset'
NAME_WIDTH = 100


def shorten(name, width=NAME_WIDTH):
    """Readable kernel name: no leading 'void ', no trailing parameter list, templates deeper than one
    level as <...>, cut to `width` characters (same rules as gpu::profiler::shorten_kernel_name)."""
    if len(name) <= width:
        return name
    s = name[5:] if name.startswith('void ') else name
    if s.endswith(')'):
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            if s[i] == ')':
                depth += 1
            elif s[i] == '(':
                depth -= 1
                if depth == 0:
                    if i > 0:
                        s = s[:i].rstrip()
                    break
    out, depth = [], 0
    for c in s:
        if c == '<':
            depth += 1
            if depth == 2:
                out.append('<...')
            elif depth < 2:
                out.append('<')
        elif c == '>':
            if depth <= 2:
                out.append('>')
            depth = max(depth - 1, 0)
        elif depth < 2:
            out.append(c)
    s = ''.join(out)
    return s if len(s) <= width else s[:width - 3] + '...'


def load(path, cats):
    """{name: [calls, total_us]} over the complete events ('ph' == 'X') of categories `cats`."""
    try:
        with open(path) as f:
            trace = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f'error: {path}: {e}')
    events = trace.get('traceEvents') if isinstance(trace, dict) else None
    if not isinstance(events, list):
        sys.exit(f'error: {path}: no traceEvents list (not a Chrome trace?)')
    rows = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get('ph') == 'X' and e.get('cat') in cats:
            r = rows[e.get('name', '?')]
            r[0] += 1
            r[1] += float(e.get('dur', 0.0))
    return rows


def single(path, steps, cats, top, full):
    rows = load(path, cats)
    total = sum(r[1] for r in rows.values())
    calls = sum(r[0] for r in rows.values())
    print(f'{path}: {total / 1e3 / steps:.3f} ms/step in {calls / steps:.1f} events/step '
          f'({",".join(sorted(cats))}, {steps} steps, {len(rows)} names)')
    if not rows:
        print('no events of these categories (a CPU-only trace? try --cat cpu_op)')
        return
    print(f'{"%":>6} {"ms/step":>9} {"calls":>8}  name')
    for name, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f'{100 * us / max(total, 1e-9):6.2f} {us / 1e3 / steps:9.3f} {n / steps:8.1f}  '
              f'{name if full else shorten(name)}')


def compare(paths, steps, cats, top, full):
    a, b = (load(p, cats) for p in paths)
    ta, tb = (sum(r[1] for r in rows.values()) / 1e3 / s for rows, s in ((a, steps[0]), (b, steps[1])))
    print(f'A = {paths[0]} ({ta:.3f} ms/step), B = {paths[1]} ({tb:.3f} ms/step); '
          f'{",".join(sorted(cats))}, per step; sorted by max(A, B)')
    print(f'{"A ms":>8} {"B ms":>8} {"A-B ms":>8} {"A calls":>8} {"B calls":>8}  name')
    names = set(a) | set(b)

    def per_step(rows, name, s):
        n, us = rows.get(name, (0, 0.0))
        return us / 1e3 / s, n / s

    lines = []
    for name in names:
        ma, ca = per_step(a, name, steps[0])
        mb, cb = per_step(b, name, steps[1])
        lines.append((max(ma, mb), ma, mb, ca, cb, name))
    for _, ma, mb, ca, cb, name in sorted(lines, reverse=True)[:top]:
        print(f'{ma:8.3f} {mb:8.3f} {ma - mb:+8.3f} {ca:8.1f} {cb:8.1f}  {name if full else shorten(name)}')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('traces', nargs='+', help='one trace, or two to compare')
    ap.add_argument('--steps', type=int, nargs='+', default=[1],
                    help='profiled steps in each trace (one value for both)')
    ap.add_argument('--top', type=int, default=30)
    ap.add_argument('--cat', default=DEVICE_WORK, help=f'event categories (default {DEVICE_WORK})')
    ap.add_argument('--full-names', action='store_true')
    a = ap.parse_args()
    if len(a.traces) > 2:
        ap.error('give one trace, or two to compare')
    steps = a.steps * len(a.traces) if len(a.steps) == 1 else a.steps
    if len(steps) != len(a.traces) or min(steps) < 1:
        ap.error('--steps: one positive value, or one per trace')
    cats = set(c.strip() for c in a.cat.split(',') if c.strip())
    if len(a.traces) == 1:
        single(a.traces[0], steps[0], cats, a.top, a.full_names)
    else:
        compare(a.traces, steps, cats, a.top, a.full_names)


if __name__ == '__main__':
    main()
