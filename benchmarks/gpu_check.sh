#!/usr/bin/env bash
# The GPU check: sdrt on any CUDA GPU machine in one command, within a 10-minute limit (benchmarks/GPU.md).
#
#   GPU:       OUT=DIR bash benchmarks/gpu_check.sh              (with .whl/ from `make gpu-wheels` beside it)
#   rehearsal: GPU_CHECK_DRY_RUN=1 OUT=DIR PYTHON=PY bash benchmarks/gpu_check.sh   (`make gpu-rehearsal`)
#
# Installs the carried wheels into a fresh site folder (--no-index --no-deps), then runs its stages in order of
# value, each under its own `timeout` and within what is left of a total wall-time budget, each writing its log
# (and its result) under $OUT. A failed or timed-out stage never stops the next. The summary table comes last, and
# is also written to $OUT/summary.md and $OUT/summary.json. benchmarks/GPU.md says how to call it and read it.
#
# Stages: install, probe, export (sd15 fp16 + torch programs, in the background from the start), tests
# (pytest -m gpu), bench (sd15 512x512, 50 steps, batch 1), bench_b4 (the same at batch 4).
# The dry run (GPU_CHECK_DRY_RUN=1) runs the same stages on the CPU with the tiny-sd1 preset and a few steps.
#
# Variables: OUT (required), PYTHON (python3), GPU_CHECK_BUDGET_S (total; 480, a dry run 900), GPU_CHECK_SITE (where the
# wheels go; default /tmp/site, a fresh temporary folder in a dry run), GPU_CHECK_WHEELS (.whl),
# GPU_CHECK_STAGES (comma-separated subset, default all), GPU_CHECK_ENGINES (where exports go, /tmp/sdrt-engines),
# GPU_CHECK_BUDGET_<stage> (one stage's budget in seconds).
set -uo pipefail

: "${OUT:?OUT must name the folder for logs and results}"
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 900 || echo 480)}  # the dry run: a 2-core machine
WHEELS=${GPU_CHECK_WHEELS:-.whl}
STAGES=${GPU_CHECK_STAGES:-install,probe,export,tests,bench,bench_b4}
ENGINES=${GPU_CHECK_ENGINES:-/tmp/sdrt-engines}
if [ "$DRY" = 1 ]; then SITE=${GPU_CHECK_SITE:-$(mktemp -d)/site}; else SITE=${GPU_CHECK_SITE:-/tmp/site}; fi
START=$(date +%s)
SUMMARY="$OUT/summary.tsv"
printf 'stage\tstatus\tseconds\tbudget_s\tresult\n' > "$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1

# What each stage does on the device, and in the dry run (CPU, tiny-sd1, a few steps). Budgets in seconds.
if [ "$DRY" = 1 ]; then
  MODEL=tiny-sd1 DEVICE=cpu EXPORT_ARGS=(--min-size 64 --max-size 128 --max-batch 4)
  BENCH_ARGS=(--device cpu --steps 4 --height 64 --width 64 --runs 2 --warmup 1)
  BENCH4_ARGS=(--device cpu --steps 4 --height 64 --width 64 --batch 4 --runs 2 --warmup 1)
else
  MODEL=sd15 DEVICE=cuda EXPORT_ARGS=()
  BENCH_ARGS=(--device cuda --steps 50 --height 512 --width 512 --batch 1 --guidance 7.5 --runs 10 --warmup 2)
  BENCH4_ARGS=(--device cuda --steps 50 --height 512 --width 512 --batch 4 --guidance 7.5 --runs 5 --warmup 1)
fi
ENGINE="$ENGINES/$MODEL-fp16"
declare -A STAGE_BUDGET=([install]=45 [probe]=60 [export]=360 [tests]=240 [bench]=150 [bench_b4]=120)
for stage in "${!STAGE_BUDGET[@]}"; do  # GPU_CHECK_BUDGET_<stage>=S overrides one stage's budget
  override="GPU_CHECK_BUDGET_$stage"
  STAGE_BUDGET[$stage]=${!override:-${STAGE_BUDGET[$stage]}}
done

now() { date +%s; }
left() { echo $((BUDGET - ($(now) - START))); }
wanted() { [[ ",$STAGES," == *",$1,"* ]]; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$SUMMARY"; }
status_of() { case "$1" in 0) echo ok ;; 124|137) echo timeout ;; *) echo "failed rc=$1" ;; esac; }
# `sdrt` through its console-script entry point (the wheel's, first on PYTHONPATH), wherever the CLI lives
SDRT_MAIN='import sys; from importlib.metadata import entry_points as e; sys.exit(next(iter(e(group="console_scripts", name="sdrt"))).load()())'
sdrt() { "$PY" -c "$SDRT_MAIN" "$@"; }

# The stage's own budget, cut to what the total has left; 0 when too little is left to start it.
grant() {
  local want=${STAGE_BUDGET[$1]} rest
  rest=$(left)
  [ "$rest" -lt 10 ] && { echo 0; return; }
  [ "$want" -gt "$rest" ] && want=$rest
  echo "$want"
}

# run_stage NAME RESULT_FN CMD...: CMD under `timeout`, its output in $OUT/NAME.log, its row in the summary.
# After a failed install every later stage is skipped: without the packages each would only fail to import.
run_stage() {
  local name=$1 result_fn=$2 budget t0 rc
  shift 2
  wanted "$name" || return 0
  if install_failed; then record "$name" "skipped (install failed)" 0 0 ""; return 0; fi
  budget=$(grant "$name")
  if [ "$budget" -eq 0 ]; then record "$name" "skipped (total budget spent)" 0 0 ""; return 0; fi
  echo "== $name (budget ${budget}s, $(left)s of the total left)"
  t0=$(now)
  timeout --kill-after=10 "$budget" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1  # functions: export -f
  rc=$?
  tail -n 5 "$OUT/$name.log" | sed "s/^/   $name| /"
  record "$name" "$(status_of $rc)" $(($(now) - t0)) "$budget" "$($result_fn "$rc" 2>/dev/null | tr '\t\n' '  ')"
}

none() { :; }

install_failed() { grep -q $'^install\t\(failed\|timeout\)' "$SUMMARY"; }

# What the machine's own Python must bring (the carried wheels bring sdrt, diffusers and the rest of .whl): every
# missing one is named in one line, before anything is installed.
missing_prereqs() {
  "$PY" - <<'EOF'
import importlib.util
need = ["torch", "numpy", "onnx", "onnxscript", "onnxruntime", "transformers", "tokenizers", "safetensors",
        "huggingface_hub", "PIL", "filelock", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
}

install_wheels() {
  local missing
  missing=$(missing_prereqs) || { echo "$PY does not run: set PYTHON to the machine's Python 3.12"; return 4; }
  if [ -n "$missing" ]; then
    echo "$PY lacks ${missing// /, }: run with a Python that has benchmarks/gpu_image.txt's packages (set PYTHON," \
      "or pip install -r benchmarks/gpu_image.txt)"
    return 4
  fi
  ls "$WHEELS"/*.whl || { echo "no wheels in $WHEELS: run make gpu-wheels here, carry .whl"; return 2; }
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  "$PY" -c 'import sdrt.runtime, sdrt.export, diffusers; print("sdrt and diffusers", diffusers.__version__, "import")'
}
install_result() {  # the failure's one line, or the wheels installed
  if [ "$1" != 0 ]; then tail -n 1 "$OUT/install.log"; else ls "$WHEELS" | tr '\n' ' '; fi
}

probe() {
  command -v nvidia-smi && nvidia-smi
  command -v nvidia-smi && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc; free -g
  "$PY" - "$OUT/probe.json" <<'EOF'
import importlib, importlib.metadata as md, json, platform, sys
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(), "packages": {}}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
               multiprocessors=p.multi_processor_count)
for mod, dist in [("sdrt.runtime", "sdrt"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                  ("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"),
                  ("tokenizers", "tokenizers"), ("safetensors", "safetensors"), ("numpy", "numpy"),
                  ("PIL", "pillow"), ("matplotlib", "matplotlib"), ("pytest", "pytest"), ("xdist", "pytest-xdist"),
                  ("polygraphy", "polygraphy"), ("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt-rtx"),
                  ("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("ray", "ray")]:
    try:
        m = importlib.import_module(mod)
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            version = getattr(m, "__version__", "?")
        out["packages"][dist] = version
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        out["packages"][dist] = f"missing ({type(err).__name__}: {err})"[:200]
try:
    import onnxruntime
    out["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:  # noqa: BLE001
    pass
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out, indent=2))
EOF
}
probe_result() {
  "$PY" -c 'import json,sys; p=json.load(open(sys.argv[1])); print(p.get("gpu","no gpu"), "torch", p["torch"],
"cuda", p["cuda"], "trt", p["packages"]["tensorrt"][:7], "trt-rtx", p["packages"]["tensorrt-rtx"][:7])' \
    "$OUT/probe.json"
}

# The export runs in the background from the start (CPU work, beside the GPU tests); `export` waits for it.
# Its wall time and the peak resident memory of the export process go to $OUT/export.json.
TIMED_PY='
import json, resource, subprocess, sys, time
t0 = time.time()
rc = subprocess.call([sys.executable, "-c", sys.argv[2], *sys.argv[3:]])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
result = {"rc": rc, "seconds": round(time.time() - t0, 1), "peak_rss_gib": round(peak, 2), "argv": sys.argv[3:]}
json.dump(result, open(sys.argv[1], "w"))
print(result)
sys.exit(rc)
'
EXPORT_PID=
start_export() {
  wanted export || return 0
  install_failed && return 0  # `wait_export` records it as skipped
  rm -rf "$ENGINE" && mkdir -p "$ENGINES"
  echo "== export (background, budget ${STAGE_BUDGET[export]}s): $MODEL -> $ENGINE"
  EXPORT_T0=$(now)
  timeout --kill-after=10 "${STAGE_BUDGET[export]}" "$PY" -c "$TIMED_PY" "$OUT/export.json" "$SDRT_MAIN" \
    export "$MODEL" "$ENGINE" --precision fp16 --torch-programs "${EXPORT_ARGS[@]}" > "$OUT/export.log" 2>&1 &
  EXPORT_PID=$!
}
wait_export() {
  wanted export || return 0
  if install_failed; then record export "skipped (install failed)" 0 0 ""; return 0; fi
  local rc
  wait "$EXPORT_PID"
  rc=$?
  tail -n 5 "$OUT/export.log" | sed 's/^/   export| /'
  record export "$(status_of $rc)" $(($(now) - EXPORT_T0)) "${STAGE_BUDGET[export]}" \
    "$(cat "$OUT/export.json" 2>/dev/null)"
}

gpu_tests() {
  "$PY" -m pytest tests/runtime/test_gpu.py -m gpu -o addopts= -p no:cacheprovider -rA -q \
    --basetemp=/tmp/sdrt-gpu-tests --junitxml="$OUT/gpu_tests.xml"
}
tests_result() { grep -E '(passed|failed|skipped|error)' "$OUT/tests.log" | tail -n 1; }

bench() {  # bench OUTDIR ARGS...
  local dir=$1
  shift
  [ -f "$ENGINE/manifest.json" ] || { echo "no export at $ENGINE (the export stage failed or did not run)"; return 3; }
  sdrt bench "$ENGINE" --out-dir "$dir" "$@"
}
bench_result() {  # the p50 of every contender and sdrt's speed-up over eager diffusers
  "$PY" - "$1" <<'EOF'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    r = json.load(open(path))
    base = next((x["e2e_ms"]["p50"] for x in r["results"] if x["name"] == "diffusers-eager"), None)
    cells = []
    for x in r["results"]:
        p50 = x["e2e_ms"]["p50"]
        gain = f" {base / p50:.2f}x" if base and x["name"] != "diffusers-eager" else ""
        psnr = f" {x['psnr_db']:.0f}dB" if x.get("psnr_db") is not None else ""
        cells.append(f"{x['name']} {p50:.0f}ms{gain}{psnr}")
    cells += [f"{f['name']} FAILED" for f in r.get("failed", [])]
    print(f"{r['device']} {r['model']} {r['width']}x{r['height']} b{r['batch']} {r['steps']} steps: " + "; ".join(cells))
EOF
}
bench1_result() { bench_result "$OUT/results"; }
bench4_result() { bench_result "$OUT/results-b4"; }

export PY OUT SITE WHEELS ENGINE SDRT_MAIN
export -f install_wheels missing_prereqs probe gpu_tests bench sdrt

echo "gpu_check: $( [ "$DRY" = 1 ] && echo "DRY RUN on the CPU" || echo device ), $MODEL, budget ${BUDGET}s, out $OUT"
run_stage install install_result install_wheels
start_export
run_stage probe probe_result probe
run_stage tests tests_result gpu_tests
wait_export
run_stage bench bench1_result bench "$OUT/results" "${BENCH_ARGS[@]}"
run_stage bench_b4 bench4_result bench "$OUT/results-b4" "${BENCH4_ARGS[@]}"

"$PY" - "$SUMMARY" "$OUT" "$(($(now) - START))" "$BUDGET" <<'EOF'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
lines = [f"# gpu_check summary ({sys.argv[3]} s of a {sys.argv[4]} s budget)", "",
         "| stage | status | s | budget s | result |", "| --- | --- | ---: | ---: | --- |"]
lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['budget_s']} | {r['result']} |" for r in rows]
first = next((r for r in rows if r["status"] != "ok"), None)  # what went wrong first is what to fix first
lines += ["", f"first failure: {first['stage']} {first['status']}: {first['result']}" if first else "every stage ok"]
open(sys.argv[2] + "/summary.md", "w").write("\n".join(lines) + "\n")
json.dump({"seconds": int(sys.argv[3]), "budget_s": int(sys.argv[4]), "stages": rows,
           "first_failure": first}, open(sys.argv[2] + "/summary.json", "w"), indent=2)
print("\n".join(lines))
EOF
grep -qv -e '^stage' -e $'\tok\t' "$SUMMARY" && exit 1
exit 0
