#!/usr/bin/env bash
# The GPU check: one command on a lent GPU machine, inside BUDGET seconds (default
# 540, 9 minutes) whatever happens. Phases, each under `timeout` with its own
# deadline; a failed phase is recorded and the later ones still run; the exit code is
# non-zero if any failed:
#   env     the machine: nvidia-smi, python, torch, CUDA
#   wheels  pip-installs .whl/*.whl (hydra-core, omegaconf, antlr4) into /tmp/site
#   data    Omniglot from $DATA/omniglot (default .gpudata), its uint8 cache built once
#   tests   pytest -m cuda: CUDA meta-gradients against the CPU, a short real run
#   bench   scripts/bench.py --device $DEVICE in priority order (the speed targets with
#           the MAML++ authors' code first, then the speed switches, then every other
#           setting), appended to one bench.json until the bench deadline
#   train   experiment=maml_omniglot_5w1s for the time left (iterations from the
#           bench's s/iter), then its meta-test; a run stopped by the deadline saves
#           last.pt and is meta-tested by metatrain-eval
# Files in $OUT (flat, 8 at most): gpu_check.log, summary.json, tests.xml, bench.json,
# results.json, metrics.jsonl.
#
# DEVICE=cpu BUDGET=60 runs the same phases on a CPU in about a minute (no wheels,
# one bench setting, a tiny training run): tests/test_gpu_check.py does, so the
# script cannot rot between GPU sessions. Other knobs: PHASES (comma list), TRAIN_ARGS
# (extra overrides), TRAIN_ITERS (fixed count), BENCH_ITERS, PY, DATA, AUTHORS_DIR.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
PHASES=${PHASES:-env,wheels,data,tests,bench,train}
OUT=${OUT:-$REPO/outputs/gpu_check}
PY=${PY:-python3}
DATA=${DATA:-$REPO/.gpudata}
AUTHORS_DIR=${AUTHORS_DIR:-$REPO/.authors_maml}
WHEELS_DIR=${WHEELS_DIR:-$REPO/.whl}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
STATUS=$WORK/phases.tsv
: >"$LOG"
: >"$STATUS"
export PYTHONUNBUFFERED=1 METATRAIN_DATA=$DATA WANDB_MODE=offline WANDB_SILENT=true
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Deadlines (seconds from START): the tests, the bench and the training share the budget.
T_ENV=$((BUDGET * 3 / 100 + 10))
T_WHEELS=$((T_ENV + 60))
T_DATA=$((BUDGET * 22 / 100))
T_TESTS=$((BUDGET * 33 / 100))
T_BENCH=$((BUDGET * 62 / 100))
T_TRAIN=$((BUDGET * 96 / 100))

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $(($1 - $(elapsed))); }
say() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$LOG"; }
wanted() { [[ ",$PHASES," == *",$1,"* ]]; }

# phase NAME DEADLINE CMD...: CMD under timeout until DEADLINE; output to the log.
phase() {
    local name=$1 deadline=$2
    shift 2
    local t0 rc limit
    t0=$(date +%s)
    limit=$(left "$deadline")
    if ! wanted "$name"; then
        return 0
    fi
    if [ "$limit" -lt 2 ]; then
        say "$name: skipped, no time left"
        printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "no time left" >>"$STATUS"
        return 1
    fi
    say "$name: start (${limit}s at most)"
    # a phase is a function of this script, run by a fresh bash that timeout can stop
    timeout -k 5 "$limit" bash -c "$*" >>"$LOG" 2>&1
    rc=$?
    local note=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="timed out"
    [ $rc -ne 0 ] && [ "$note" = ok ] && note=failed
    say "$name: $note (rc $rc, $(($(date +%s) - t0))s)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$note" >>"$STATUS"
    return $rc
}

env_info() {
    command -v nvidia-smi >/dev/null && nvidia-smi
    uname -a
    "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("hydra", "omegaconf", "rich", "numpy", "PIL", "pytest"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"))
    except ImportError as e:
        print(name, "MISSING", e)
EOF
}

install_wheels() {
    if "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
        echo "hydra and omegaconf already importable"
        return 0
    fi
    ls "$WHEELS_DIR"/*.whl || { echo "no wheels in $WHEELS_DIR: run make gpu-wheels here"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS_DIR"/*.whl || return 1
    "$PY" -c "import hydra, omegaconf; print('hydra', hydra.__version__, 'omegaconf', omegaconf.__version__)"
}

build_data() {
    [ -d "$DATA/omniglot/omniglot-py" ] || {
        echo "no Omniglot in $DATA/omniglot/omniglot-py: run make gpu-data here and carry .gpudata"
        return 1
    }
    "$PY" -c "
from pathlib import Path
from metatrain.data.omniglot import load_omniglot_images
images, _ = load_omniglot_images(Path('$DATA') / 'omniglot', 28, False)
print('omniglot', tuple(images.shape))"
}

run_tests() {  # on a CPU every one of them skips: the collection is what is checked
    "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/tests.xml" \
        -o junit_family=xunit2 tests/test_cuda.py
}

bench() {  # bench NAME... -- bench.py arguments, appended to bench.json until T_BENCH
    local settings=$1
    shift
    local budget
    budget=$(left "$T_BENCH")
    [ "$budget" -gt 5 ] || { echo "bench: no time left for $settings"; return 0; }
    "$PY" scripts/bench.py --device "$DEVICE" --settings "$settings" --append \
        --out "$OUT/bench.json" --budget $((budget - 3)) --timeout 120 "$@"
}

run_bench() {
    local iters=${BENCH_ITERS:-20} warm=5 authors=() rc=0
    [ -f "$AUTHORS_DIR/few_shot_learning_system.py" ] && authors=(--authors-dir "$AUTHORS_DIR")
    rm -f "$OUT/bench.json"
    if [ "$DEVICE" = cpu ]; then  # the dry run: one setting, one unit, no FLOP count
        bench maml-omniglot-5w1s --iters 1 --warmup 0 --no-flops --baselines "" \
            --matmul-size 256 model.filters=8 algorithm.meta_batch=4 || rc=1
        return $rc
    fi
    local targets=maml-omniglot-5w1s,mamlpp-omniglot-20w1s,mamlpp-miniimagenet-5w1s
    local main=fomaml-omniglot-5w1s,reptile-omniglot-5w5s,eval-maml-omniglot-5w1s
    main=$main,eval-mamlpp-omniglot-20w1s,eval-mamlpp-miniimagenet-5w1s,eval-reptile-omniglot-5w5s
    local common=(--iters "$iters" --warmup "$warm")
    # 1. the targets beside the authors' code (and the naive loop), default switches
    bench "$targets,eval-mamlpp-omniglot-20w1s,eval-mamlpp-miniimagenet-5w1s" "${common[@]}" \
        --baselines naive,authors "${authors[@]}" || rc=1
    # 2. the targets under each speed switch: TF32 off, bf16, compile, CUDA graphs
    bench "$targets" "${common[@]}" --baselines "" --speed fp32,bf16,compile,graphs || rc=1
    # 3. the other main settings, default switches and bf16, then compiled
    bench "$main" "${common[@]}" --baselines "" --speed plain,bf16 || rc=1
    bench "$main" "${common[@]}" --baselines "" --speed compile,graphs || rc=1
    # 4. every other setting, default switches
    local rest
    rest=$("$PY" -c "
import sys; sys.path.insert(0, 'scripts'); import bench
done = set('$targets,$main'.split(','))
print(','.join(n for n in bench.SETTINGS if n not in done))")
    bench "$rest" "${common[@]}" --baselines "" || rc=1
    return $rc
}

train_iters() {  # iterations that fit in $1 seconds at the bench's s/iter
    "$PY" - "$OUT/bench.json" "$1" "$DEVICE" <<'EOF'
import json, sys
path, seconds, device = sys.argv[1], float(sys.argv[2]), sys.argv[3]
s = {"cuda": 0.05}.get(device, 1.0)  # no bench row: a guess, the deadline still holds
try:
    for r in json.load(open(path))["results"]:
        if (r["setting"], r.get("impl"), r.get("speed", "plain"), r["backend"]) == (
            "maml-omniglot-5w1s", "ours", "plain", "auto") and "error" not in r:
            s = r["s_per_iter"]
except (OSError, ValueError, KeyError):
    pass
# 80% of the time for iterations: validation, checkpoints and start-up take the rest
print(max(10, int(0.8 * seconds / s)))
EOF
}

run_train() {
    local run=$WORK/train reserve=$((BUDGET / 12)) n rc
    local seconds=$(($(left "$T_TRAIN") - reserve))
    n=${TRAIN_ITERS:-$(train_iters "$seconds")}
    local every=$(((n + 9) / 10))
    echo "training $n iterations (about ${seconds}s), validating every $every"
    # shellcheck disable=SC2086
    timeout -s TERM -k 10 "$seconds" "$PY" -m metatrain.cli experiment=maml_omniglot_5w1s \
        logger=none "device=$DEVICE" "train.iterations=$n" "train.val_interval=$every" \
        "train.checkpoint_interval=$every" "train.log_interval=$(((n + 49) / 50))" \
        "hydra.run.dir=$run" ${TRAIN_ARGS:-}
    rc=$?
    [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/metrics.jsonl"
    if [ -f "$run/results.json" ]; then
        cp "$run/results.json" "$OUT/results.json"
        return $rc
    fi
    echo "training stopped before its end (rc $rc): meta-testing its last checkpoint"
    "$PY" -m metatrain.eval_cli "$run" "device=$DEVICE" || return 1
    local ev
    ev=$(ls "$run"/eval/*.json 2>/dev/null | head -1)
    [ -n "$ev" ] && cp "$ev" "$OUT/results.json"
    return 1  # a run cut short is a failed phase, even with its meta-test
}

export REPO DEVICE BUDGET PHASES OUT PY DATA AUTHORS_DIR WHEELS_DIR WORK START LOG
export T_TESTS T_BENCH T_TRAIN
export -f elapsed left env_info install_wheels build_data run_tests bench run_bench
export -f train_iters run_train

say "device $DEVICE, budget ${BUDGET}s, phases $PHASES, out $OUT"
phase env "$T_ENV" env_info
if [ "$DEVICE" != cpu ] && [ -z "${NO_WHEELS:-}" ]; then
    phase wheels "$T_WHEELS" install_wheels
fi
export PYTHONPATH=/tmp/site:$PYTHONPATH
phase data "$T_DATA" build_data
phase tests "$T_TESTS" run_tests
phase bench "$T_BENCH" run_bench
phase train "$T_TRAIN" run_train
rm -f "$OUT"/*.tmp

"$PY" - "$STATUS" "$OUT" "$DEVICE" "$BUDGET" "$(elapsed)" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
status, out, device, budget, took = sys.argv[1:]
phases = []
for line in Path(status).read_text().splitlines():
    name, rc, secs, note = line.split("\t")
    phases.append({"phase": name, "rc": int(rc), "seconds": int(secs), "status": note})
summary = {"device": device, "budget_s": int(budget), "elapsed_s": int(took),
           "ok": all(p["rc"] == 0 for p in phases), "phases": phases,
           "files": sorted(p.name for p in Path(out).iterdir())}
results = Path(out) / "results.json"
if results.is_file():
    summary["results"] = json.loads(results.read_text())
(Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
for p in phases:
    print(f"{p['phase']:<8} {p['status']:<10} rc {p['rc']:<4} {p['seconds']:>5} s")
print("all phases ok" if summary["ok"] else "SOME PHASES FAILED", f"({took} s of {budget})")
EOF
[ -f "$OUT/bench.json" ] && "$PY" scripts/bench.py --show "$OUT/bench.json" 2>&1 | tail -n 60
[ -f "$OUT/results.json" ] && "$PY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
t = r.get('test') or r.get('single') or {}
print('maml_omniglot_5w1s:', r.get('status', 'metatrain-eval'), r.get('iterations'), 'iterations,',
      'test acc', t.get('acc'), '+-', t.get('ci95'), 'over', t.get('tasks'), 'tasks,',
      'sec/iter', r.get('sec_per_iter'))" "$OUT/results.json"
! cut -f2 "$STATUS" | grep -qv '^0$'
