#!/usr/bin/env bash
# One GPU check in under 8 minutes: the CUDA tests, then the speed of every GPU step at ML-25M sizes (bf16).
#
#   bench/gpu_check.sh OUT_DIR
#
# Needs one CUDA GPU visible to torch; without one it exits 2 before writing anything. Each step runs
# under its own `timeout` (budget below: at most ~7.6 min in all) and writes into OUT_DIR:
#   env.txt, env.json        nvidia-smi, torch / CUDA versions, GPU name
#   tests.txt                pytest -q tests/test_cuda.py tests/test_beam_search.py tests/test_tiger.py
#   tiger.json               bench/bench_decoder.py: TIGER training examples/s, beam-search users/s
#   sasrec.json              bench/bench_sasrec.py: SASRec training sequences/s
#   rqvae.json               bench/bench_rqvae.py train: RQ-VAE items/s
#   posters.json, posters.md bench/bench_poster_features.py --synthetic 512: poster feature images/s
#   <step>.log               each step's other output; steps.tsv: name, exit code, seconds, limit, command
#   gpu_check.json, gpu_check.md   the merged report (bench/gpu_check_report.py): one table
# A step that fails or times out is a FAILED row in the report, and the script then exits 1.
# PYTHON=/path/to/python overrides the interpreter (default .venv/bin/python, else python3).
set -euo pipefail

usage() {
    echo "usage: bench/gpu_check.sh OUT_DIR" >&2
    echo "  runs the CUDA tests and the ML-25M-size GPU benchmarks (under 8 minutes on one GPU) and" >&2
    echo "  writes JSON and markdown results into OUT_DIR (created if absent)." >&2
}
if [[ $# -ne 1 || -z "$1" ]]; then
    usage
    exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    exit 0
fi

OUT=$(realpath -m -- "$1")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

# ---- 1. A CUDA GPU, or a clear failure before anything is written.
set +e
probe=$("$PY" -c '
import sys
try:
    import torch
except Exception as err:
    print(f"torch cannot be imported ({err})")
    sys.exit(4)
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
sys.exit(0 if torch.cuda.is_available() else 3)
' 2>&1)
probe_rc=$?
set -e
if [[ $probe_rc -ne 0 ]]; then
    if [[ $probe_rc -eq 3 ]]; then
        echo "error: bench/gpu_check.sh needs a CUDA GPU visible to torch (torch.cuda.is_available() is False;" \
             "$probe; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})." \
             "Run it on a machine with an NVIDIA GPU and a CUDA build of torch. Nothing was run or written." >&2
    else
        echo "error: bench/gpu_check.sh needs a CUDA GPU visible to torch, but $PY could not check:" \
             "$(echo "$probe" | tail -n 1). Install the project (README section 4) or set PYTHON=..." \
             "Nothing was run or written." >&2
    fi
    exit 2
fi

mkdir -p "$OUT"
# A result left by an earlier check must never pass for this one's.
rm -f "$OUT"/{steps.tsv,env.txt,env.json,tests.txt,tiger.json,sasrec.json,rqvae.json,posters.json,posters.md} \
      "$OUT"/{gpu_check.json,gpu_check.md}
FAILED=()
echo "gpu_check: $probe; python $PY; writing into $OUT" >&2

# run_step NAME LIMIT_S STDOUT_FILE COMMAND...: run COMMAND under `timeout`, stdout to STDOUT_FILE (- : into the
# log too), stderr to OUT/NAME.log; record name, exit code, seconds, limit and command (OUT_DIR standing for
# the folder) in steps.tsv. Never stops the script.
run_step() {
    local name=$1 limit=$2 stdout=$3
    shift 3
    local started=$SECONDS rc=0 log="$OUT/$name.log"
    echo "gpu_check: step $name (limit ${limit} s): $*" >&2
    if [[ "$stdout" == "-" ]]; then
        timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1 || rc=$?
    else
        timeout --kill-after=5 "$limit" "$@" > "$stdout" 2> "$log" || rc=$?
    fi
    local command="$*"
    command=${command//"$OUT"/OUT_DIR}
    command=${command//[$'\t\n']/ }  # one line per step in steps.tsv
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" "$limit" "$command" >> "$OUT/steps.tsv"
    if [[ $rc -ne 0 ]]; then
        FAILED+=("$name")
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            echo "gpu_check: step $name TIMED OUT after ${limit} s (exit $rc); see $OUT/$name.log" >&2
        else
            echo "gpu_check: step $name FAILED (exit $rc); see $OUT/$name.log" >&2
        fi
        tail -n 8 "$log" | sed "s/^/    $name: /" >&2
    fi
}

# ---- 2. The steps. Time limits (each + 5 s kill grace): env 15, tests 100, TIGER 90, SASRec 60, RQ-VAE 45,
# posters 75 = 385 s, + 30 s grace + the report's 30 s + the probe's ~10 s = ~455 s (7.6 min) if every step
# ran to its limit; each limit is several times the step's expected time on an H200.
# Sizes: ML-25M's 62,423 items everywhere; TIGER preset batch 256, beam 20 / top-10 over 1,024 users per call;
# SASRec as configs/sasrec_ml25m.gin (batch 128 x 200, full softmax); RQ-VAE on the 1,294-wide fused ML-25M
# features (bench/results/rqvae.md), batch 1,024; posters 224 px, batch 128, 8 decoding workers.
run_step env 15 "$OUT/env.txt" \
    bash -c 'nvidia-smi && echo && "$0" bench/gpu_check_report.py --write-env "$1"' "$PY" "$OUT/env.json"
run_step tests 100 "$OUT/tests.txt" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_beam_search.py tests/test_tiger.py
run_step tiger 90 - \
    "$PY" bench/bench_decoder.py --device cuda --items 62423 --batch 256 --steps 20 --eval-batch 1024 \
    --eval-repeats 3 --out "$OUT/tiger.json"
run_step sasrec 60 - \
    "$PY" bench/bench_sasrec.py --device cuda --steps 30 --warmup 3 --out "$OUT/sasrec.json"
run_step rqvae 45 "$OUT/rqvae.json" \
    "$PY" bench/bench_rqvae.py train --device cuda --items 62423 --features 1294 --steps 300
run_step posters 75 - \
    "$PY" bench/bench_poster_features.py --device cuda --synthetic 512 --backbones efficientnet_lite0,resnet50 \
    --weights none --batch-size 128 --workers 8 --repeats 2 --out "$OUT/posters.md" --json "$OUT/posters.json"

# ---- 3. The merged report; any failed step (or a failed report) makes the script exit 1.
report_rc=0
timeout 30 "$PY" bench/gpu_check_report.py "$OUT" || report_rc=$?
if [[ ${#FAILED[@]} -gt 0 || $report_rc -ne 0 ]]; then
    echo "gpu_check: FAILED steps: ${FAILED[*]:-none}; report exit $report_rc; see $OUT/gpu_check.md" >&2
    exit 1
fi
echo "gpu_check: every step passed; results in $OUT/gpu_check.md and $OUT/gpu_check.json" >&2
