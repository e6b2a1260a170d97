#!/usr/bin/env bash
# Everything the accelerator results need from one GPU host, in one command that
# ends within DEADLINE_S seconds (default 570, under a time-limited GPU session's
# 10-minute command):
#
#   benchmarks/gpu_session.sh OUT_DIR [WHEELS_DIR]
#
# In order, the comparisons that matter most first, each step's time limit the
# smaller of its own and what is left before the deadline:
# 1. The bundled main job (`assim-run`, plots and progress off, a fresh
#    compilation cache) on two cores of the host's CPU (`JAX_PLATFORMS=cpu
#    taskset -c 0,1`), the base the GPU's main job is compared with:
#    OUT_DIR/main_cpu.json (its metrics.json, the wall time added).
# 2. `bench_accelerator.py` at its GPU sizes, one section group at a time, each
#    with a `--budget-s` 60 s short of its time limit and its JSON rewritten after
#    every row: `cli` (the main job on the GPU, twice into one fresh compilation
#    cache), `windows` (the main job's window at 32/128/512), then `gradients`
#    (256-2048) and `throughput`: OUT_DIR/accelerator_{cli,windows,rest}.json.
# 3. The model and gradient tests on the GPU (`-p no:benchmark`: the
#    pytest-benchmark plugin, where installed, warns under xdist, and the test
#    settings make warnings errors) in what time is left.
# Everything printed also goes to OUT_DIR/session.log.
#
# The project must be importable: installed (`pip install -e .`), or, on a host
# without internet, its wheel (`pip wheel . --no-deps -w WHEELS_DIR`) in
# WHEELS_DIR with wheels of what the host's Python lacks (e.g. netCDF4, cftime,
# hydra-core, omegaconf, antlr4-python3-runtime, dask, partd, locket,
# cloudpickle): all installed with `pip --no-index --no-deps --target` into a
# temporary directory put on PYTHONPATH. Run it from the repository's root (the
# modules run with `python -P`: the source tree's `assim/`, which lacks the
# installed `assim.configs`, is not put first on the path). PYTHON: the
# interpreter (default python3); BENCH_ARGS: extra bench_accelerator arguments.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [WHEELS_DIR]}
wheels=${2:-}
mkdir -p "$out"
exec > >(tee "$out/session.log") 2>&1
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=$((SECONDS + ${DEADLINE_S:-570}))

limit() {  # limit SECONDS: the smaller of SECONDS and what is left (at least 1)
    local left=$((deadline - SECONDS))
    echo $((left < $1 ? (left > 1 ? left : 1) : $1))
}

if [ -n "$wheels" ]; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$wheels"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -P -c "import assim.configs, netCDF4, hydra" || {
    echo "the project or one of its dependencies is not importable (see above)"
    exit 1
}
"$py" -c "import jax; print(jax.devices(), jax.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null

# 1. The main job on two CPU cores.
pin=(taskset -c 0,1)
command -v taskset >/dev/null || { pin=(); echo "no taskset: the CPU run uses every core"; }
run=$(mktemp -d)
t0=$SECONDS
JAX_PLATFORMS=cpu timeout "$(limit 150)" "${pin[@]}" "$py" -P -m assim._cli.run \
    "hydra.run.dir=$run" "compilation_cache.dir=$run/cache" plot=false progress=false
echo "main job on the CPU: exit $?, $((SECONDS - t0)) s wall"
if [ -f "$run/metrics.json" ]; then
    "$py" - "$run/metrics.json" "$out/main_cpu.json" "$((SECONDS - t0))" <<'EOF'
import json, sys
metrics = json.load(open(sys.argv[1]))
metrics["wall_s"] = float(sys.argv[3])
json.dump(metrics, open(sys.argv[2], "w"), indent=1)
EOF
fi

# 2. The accelerator benchmark, a section group at a time.
bench() {  # bench NAME TIME_LIMIT_S SECTION...
    local seconds
    seconds=$(limit "$2")
    timeout "$seconds" "$py" benchmarks/bench_accelerator.py \
        --budget-s $((seconds > 60 ? seconds - 60 : 0)) \
        --json "$out/accelerator_$1.json" --only "${@:3}" ${BENCH_ARGS:-}
}
bench cli 200 cli
bench windows 200 windows
bench rest 150 gradients throughput

# 3. The tests on the GPU.
timeout "$(limit 120)" "$py" -P -m pytest -p no:benchmark -q -x \
    tests/test_models.py tests/test_gradients.py
