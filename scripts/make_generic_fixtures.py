"""Writes the pyskl fixtures of tests/generic_data.rs (run once; the outputs are committed):

  tests/fixtures/generic/pyskl_2d_coco.pkl   protocol 2 (mmcv's default), 18 samples, COCO-17 2D,
                                             keypoint float32 (M, T, 17, 2), keypoint_score float16,
                                             splits xsub_* and xview_*
  tests/fixtures/generic/pyskl_3d_ntu.pkl    protocol 4, 18 samples, NTU 3D float32 (M, T, 25, 3),
                                             split xsub_*
  tests/fixtures/generic/pyskl_p5.pkl        protocol 5 (numpy _frombuffer), 2 tiny samples
  tests/fixtures/generic/pyskl_2d_expected_xsub_train.npy
                                             the xsub_train rows as an independent numpy
                                             implementation of docs/data-formats.md's
                                             preprocessing computes them (frames 20, bodies 2,
                                             no score channel, no normalisation)

Usage: python scripts/make_generic_fixtures.py  (numpy only)
"""
import pickle
import numpy as np

rng = np.random.default_rng(15)
OUT = "tests/fixtures/generic/"


def motion(label, t, v, c, m):
    base = rng.normal(0, 0.3, size=(v, c))
    phase = np.linspace(0, 2 * np.pi, t)[:, None, None]
    amp = (label + 1) * 0.2
    x = base[None] + amp * np.sin(phase * (label + 1)) * rng.normal(1, 0.1, size=(1, v, c))
    x = x + rng.normal(0, 0.01, size=x.shape)
    bodies = [x + 100.0 + 5 * k for k in range(m)]
    return np.stack(bodies).astype(np.float32)  # (M, T, V, C)


def annotations(n, v, c, score):
    anns = []
    for i in range(n):
        label = i % 3
        t = 12 + (i * 7) % 19
        m = 2 if i % 5 == 0 else 1
        kp = motion(label, t, v, c, m)
        a = {"frame_dir": f"S{i:03d}", "label": label, "keypoint": kp, "total_frames": t,
             "img_shape": (1080, 1920), "original_shape": (1080, 1920)}
        if score:
            a["keypoint_score"] = rng.uniform(0.2, 1.0, size=kp.shape[:3]).astype(np.float16)
        anns.append(a)
    # Sample 4: the last 3 frames are zero (padding a pose estimator leaves): excluded from L.
    if n > 4:
        anns[4]["keypoint"][:, -3:] = 0
    return anns


def splits(n):
    names = [f"S{i:03d}" for i in range(n)]
    return {
        "xsub_train": [x for i, x in enumerate(names) if i % 6 < 4],
        "xsub_val": [x for i, x in enumerate(names) if i % 6 >= 4],
        "xview_train": [x for i, x in enumerate(names) if i < 12],
        "xview_val": [x for i, x in enumerate(names) if i >= 12],
    }


def resize(x, out):  # (L, ...) -> (out, ...), OpenCV INTER_LINEAR half-pixel rule, float64
    L = x.shape[0]
    res = np.zeros((out,) + x.shape[1:], dtype=np.float64)
    for t in range(out):
        s = (t + 0.5) * L / out - 0.5
        i0 = int(np.floor(s))
        w = s - i0
        r0, r1 = min(max(i0, 0), L - 1), min(max(i0 + 1, 0), L - 1)
        res[t] = x[r0] * (1 - w) + x[r1] * w
    return res


def preprocess(kp, frames, bodies, center):
    m_in, t, v, c = kp.shape
    x = np.zeros((bodies, t, v, c), dtype=np.float32)
    x[: min(m_in, bodies)] = kp[:bodies]
    valid = np.abs(x).sum(axis=(0, 2, 3)) != 0
    idx = np.nonzero(valid)[0]
    x = x[:, idx]
    present = np.abs(x).sum(axis=(2, 3)) != 0  # (M, L)
    x = x - x[:, :, center: center + 1, :] * present[:, :, None, None]
    y = np.stack([resize(x[m], frames) for m in range(bodies)])  # (M, frames, V, C)
    return y.transpose(3, 1, 2, 0).astype(np.float32)  # (C, frames, V, M)


n = 18
anns2d = annotations(n, 17, 2, score=True)
with open(OUT + "pyskl_2d_coco.pkl", "wb") as f:
    pickle.dump({"split": splits(n), "annotations": anns2d}, f, protocol=2)
exp = [preprocess(a["keypoint"], 20, 2, 0) for a in anns2d if a["frame_dir"] in splits(n)["xsub_train"]]
np.save(OUT + "pyskl_2d_expected_xsub_train.npy", np.stack(exp))

anns3d = annotations(n, 25, 3, score=False)
with open(OUT + "pyskl_3d_ntu.pkl", "wb") as f:
    sp = splits(n)
    pickle.dump({"split": {"xsub_train": sp["xsub_train"], "xsub_val": sp["xsub_val"]},
                 "annotations": anns3d}, f, protocol=4)

tiny = annotations(2, 17, 2, score=True)
for a in tiny:
    a["keypoint"] = a["keypoint"][:, :3]
    a["keypoint_score"] = a["keypoint_score"][:, :3]
with open(OUT + "pyskl_p5.pkl", "wb") as f:
    pickle.dump({"split": {"a_train": ["S000"], "a_val": ["S001"]}, "annotations": tiny}, f,
                protocol=5)

# Error cases, one sample each (protocol 2): good, NaN keypoint, zero valid frames, no label,
# 18 joints for a 17-joint layout.
bad = annotations(5, 17, 2, score=False)
for a in bad:
    a["keypoint"] = a["keypoint"][:, :6]
bad[1]["keypoint"][0, 2, 5, 1] = np.nan
bad[2]["keypoint"][:] = 0
del bad[3]["label"]
bad[4]["keypoint"] = np.concatenate([bad[4]["keypoint"], bad[4]["keypoint"][:, :, :1]], axis=2)
for i, a in enumerate(bad):
    a["frame_dir"] = ["good", "nan", "zero", "nolabel", "joints18"][i]
with open(OUT + "pyskl_bad.pkl", "wb") as f:
    pickle.dump({"split": {"x_train": ["good", "nan", "zero", "nolabel", "joints18"], "x_val": []},
                 "annotations": bad}, f, protocol=2)
