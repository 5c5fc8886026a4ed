#!/usr/bin/env bash
# Times `crossclr prepare ntu60` against the official two-step Python pipeline of LinguoLi/CrosSCLR
# (tools/ntu_gendata.py, then feeder/preprocess_ntu.py) on the same raw corpus, and checks that both
# produce the same files. Not a test: run by hand, numbers go to docs/prepare-benchmark.md.
#
#   scripts/bench_prepare.sh <raw_dir> [work_dir]
#
# <raw_dir>: .skeleton files, e.g. from
#   cargo run --release --example gen_ntu_raw -- /tmp/bench/raw_e28 --every 28
# Environment:
#   OFFICIAL  folder holding the official files, laid out as in the CrosSCLR repository:
#             tools/ntu_gendata.py, tools/utils/ntu_read_skeleton.py, tools/utils/__init__.py,
#             feeder/preprocess_ntu.py, feeder/NTUDatasets.py (default /tmp/crossclr-official).
#             They are NOT part of this repository; fetch them from github.com/LinguoLi/CrosSCLR.
#   PY        python with numpy and torch (default: .venv/bin/python of this repository)
#   PYDEPS    extra PYTHONPATH with cv2, e.g. made by
#             $PY -m pip install --no-deps --target /tmp/bench-pydeps "opencv-python-headless<5"
#   SKIP_PY=1 time only crossclr.
#   THREADS   crossclr --threads (default 0 = all cores)
#   SKIP_BUILD=1 use the existing target/release/crossclr.
set -euo pipefail
RAW=${1:?usage: bench_prepare.sh <raw_dir> [work_dir]}
WORK=${2:-/tmp/crossclr-bench-prepare}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OFFICIAL=${OFFICIAL:-/tmp/crossclr-official}
PY=${PY:-$ROOT/.venv/bin/python}
PYDEPS=${PYDEPS:-/tmp/bench-pydeps}
THREADS=${THREADS:-0}
MISSING=$ROOT/resources/ntu/NTU_RGBD_samples_with_missing_skeletons.txt

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "corpus:  $RAW: $(ls "$RAW" | grep -c '\.skeleton$') files, $(du -sh "$RAW" | cut -f1)"
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$ROOT" && cargo build --release --bin crossclr 2>&1 | tail -1)
# Clear the scratch folder, but only one made by this script (or an empty one).
if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK")" ] && [ ! -e "$WORK/times" ] && [ ! -d "$WORK/rust" ]; then
    echo "refusing to clear $WORK: not a bench_prepare.sh work folder" >&2
    exit 1
fi
rm -rf "$WORK" && mkdir -p "$WORK" && touch "$WORK/times"

# Page cache: read the corpus once so both tools start warm (when it fits in memory).
find "$RAW" -maxdepth 1 -name '*.skeleton' -print0 | xargs -0 cat > /dev/null

# Wall and CPU (user + sys) seconds of a command: "<wall> <cpu>" appended to $WORK/times.
TIMEFORMAT='%R %U %S'
timed() {
    local name=$1
    shift
    local t
    { t=$( { time "$@" >> "$WORK/$name.log" 2>&1; } 2>&1 ); } || { cat "$WORK/$name.log"; return 1; }
    read -r wall user sys <<< "$t"
    echo "$name $wall $(echo "$user + $sys" | bc)" >> "$WORK/times"
    echo "$name: ${wall} s wall, $(echo "$user + $sys" | bc) s CPU"
}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
timed crossclr "$ROOT/target/release/crossclr" prepare ntu60 --raw "$RAW" --out "$WORK/rust" --threads "$THREADS"
cat "$WORK/crossclr.log"
RUST_S=$(awk '$1=="crossclr" {print $2}' "$WORK/times")
RUST_CPU=$(awk '$1=="crossclr" {print $3}' "$WORK/times")
[ "${SKIP_PY:-0}" = 1 ] && exit 0

# The official scripts, copied to the scratch folder and patched only where today's libraries
# require it: numpy >= 2.1 dropped np.reshape(newshape=...).
mkdir -p "$WORK/official"
cp -r "$OFFICIAL/tools" "$OFFICIAL/feeder" "$WORK/official/"
sed -i 's/np.reshape(each_s, newshape=/np.reshape(each_s, /; s/np.reshape(r_t, newshape=/np.reshape(r_t, /' \
    "$WORK/official/feeder/NTUDatasets.py"
export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK/official/tools"
timed ntu_gendata "$PY" ntu_gendata.py --data_path "$RAW" --ignored_sample_path "$MISSING" \
    --out_folder "$WORK/py/NTU-RGB-D"
cd "$WORK/official/feeder"
timed preprocess_ntu "$PY" preprocess_ntu.py --dataset_path "$WORK/py/NTU-RGB-D" \
    --out_folder "$WORK/py/NTU60_frame50"
cd "$ROOT"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
PY_S=$(awk '$1!="crossclr" {s += $2} END {print s}' "$WORK/times")
PY_CPU=$(awk '$1!="crossclr" {s += $3} END {print s}' "$WORK/times")
echo "official total: ${PY_S} s wall, ${PY_CPU} s CPU"
echo "speed-up: $(echo "scale=1; $PY_S / $RUST_S" | bc)x wall, $(echo "scale=1; $PY_CPU / $RUST_CPU" | bc)x CPU"

"$PY" - "$WORK" <<'EOF'
import numpy as np, pickle, sys
w = sys.argv[1]
ok = True
for b in ["xsub", "xview"]:
    for p in ["train", "val"]:
        rn, rl = pickle.load(open(f"{w}/rust/{b}/{p}_label.pkl", "rb"))
        on, ol = pickle.load(open(f"{w}/py/NTU-RGB-D/{b}/{p}_label.pkl", "rb"))
        same_pkl = (rn, rl) == (on, ol)
        rd = np.load(f"{w}/rust/{b}/{p}_data.npy", mmap_mode="r")
        od = np.load(f"{w}/py/NTU-RGB-D/{b}/{p}_data.npy", mmap_mode="r")
        same_data = rd.shape == od.shape and all(np.array_equal(rd[i], od[i]) for i in range(len(rd)))
        rp = np.load(f"{w}/rust/{b}/{p}_position.npy", mmap_mode="r")
        op = np.load(f"{w}/py/NTU60_frame50/{b}/{p}_position.npy", mmap_mode="r")
        diff = max(float(np.abs(rp[i].astype(np.float64) - op[i]).max()) for i in range(len(rp))) if len(rp) else 0.0
        exact = sum(np.array_equal(rp[i], op[i]) for i in range(len(rp)))
        close = rp.shape == op.shape and all(np.allclose(rp[i], op[i], rtol=1e-5, atol=1e-6) for i in range(len(rp)))
        print(f"{b}/{p}: N={len(rd)} label.pkl equal={same_pkl} data.npy bit-identical={same_data} "
              f"position.npy allclose(1e-5,1e-6)={close} bit-identical samples {exact}/{len(rp)} max|diff|={diff:.3g}")
        ok &= same_pkl and same_data and close
print("OUTPUTS MATCH" if ok else "OUTPUTS DIFFER")
EOF
