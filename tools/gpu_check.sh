#!/usr/bin/env bash
# Check and time mom_lit on this machine's GPUs, one step after another, each under its own time limit, every
# log and table written to OUT_DIR (nothing is lost when a step runs out of time: it is logged as such and the
# next step starts).
#
#   tools/gpu_check.sh OUT_DIR [STEP ...]      (from any folder; mom_lit importable, pytest for the tests)
#
# Steps (default: all, in this order):
#   tests   the GPU test files (Triton scan, decoding step, slot/mix stages, fused blocks, model invariants)
#   layer   bench_layer.py, layer section: ours (Triton stages on, off, and the memory-lean settings: q, k, v and
#           W, U rebuilt in the backward), then fla's rows if fla is importable
#   model   bench_layer.py, model section: our MoM model (plain, checkpointed blocks, memory-lean), then fla's GDN
#   compare the targets' table in one go on GPU 0: our layer and model rows (default and memory-lean) while fla
#           autotunes on GPU 1 (its cache on disk), then fla's rows on GPU 0 with the host to itself (the method of
#           BENCHMARKS.md's table)
#   interleaved  the same targets with every candidate alive in one process and timed in turn, round after round
#           (bench_layer.py --rounds: median and range per row), so that drifts of the host reach all alike: the
#           layer (ours, fla's GatedDeltaNet), then the model step eager and graphed (ours fast and balanced, fla's)
#   graphs  bench_layer.py, model section with each training step captured as a CUDA graph (device time, no host
#           launch work): our MoM and single-memory models, then fla's GDN
#   mixed   bench_layer.py, model section with fp32 weights under bf16 autocast (the configs' bf16-mixed):
#           our MoM model (default and memory-lean), then fla's GDN
#   stages  bench_stages.py: the slot/mix stage kernels alone, and a sweep of their launch settings
#   profile bench_layer.py profile sections: top kernels of our layer's fwd+bwd and of our model's step
#   devicetime  the layer targets on device time: profiles of our MoM layer's and fla's GatedDeltaNet's fwd+bwd
#           at 8 x 2048 and 2 x 8192 (fla autotunes in the untimed warm-up calls of its first profile), every
#           kernel in OUT/devicetime.json, and a table of device and wall time per call
#   against (only when named) before/after against another checkout of mom_lit (BASE=<its folder>), both timed
#           in this call, in turn:
#           the layer's fwd+bwd device time at 8 x 2048 (profiled, ROUNDS rounds, base and this alternating) and the
#           12-layer training step eager and captured as a CUDA graph (3 rounds in one process per tree), each with
#           activation memory fast and balanced; tools/compare_trees.py writes OUT/against.md
#   decode  bench_decode.py: per-token latency against context length, MoM / GDN / SDPA
#   interop verify_fla_interop.py: our converted models against fla's, fp32 and bf16 (needs fla)
#   scale   scale_runs.py with 2+ GPUs: 1 GPU, DDP, FSDP, two single-GPU "nodes"
# Outside the interleaved step, fla's rows run in processes of their own, after ours on the same card, with the
# longest limits: its first calls autotune for minutes. TRITON_CACHE_AUTOTUNING=1 keeps those results on disk, so
# its later processes skip that.
# Limits (seconds) can be changed through the environment: TESTS_S, LAYER_S, FLA_S, MODEL_S, STAGES_S, PROFILE_S,
# DECODE_S, INTEROP_S, SCALE_S. fla's timings lift its Hopper guard (--fla-timing-only): they are timings, not
# correctness claims. fla's speed varies between runs with what else the host does while it autotunes: time on a
# quiet host (nothing on the other GPUs) and compare only rows of the same run.
set -u
if [ $# -lt 1 ]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"  # the header comment
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
shift
ALL_STEPS="tests layer model compare interleaved graphs mixed stages profile devicetime decode interop scale"
# "against" runs only when named (it needs BASE)
STEPS=${*:-$ALL_STEPS}
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
status=0

# run NAME SECONDS CMD...: CMD's output to OUT/NAME.log; a line per step in OUT/summary.txt
run() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "[$name] $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local verdict="exit $rc"
    [ $rc -eq 124 ] && verdict="TIME LIMIT ($limit s)"
    [ $rc -ne 0 ] && status=1
    echo "$name: $verdict after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

has_fla() { python -c "import fla" >/dev/null 2>&1; }
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
    echo "no CUDA device visible" >&2
    exit 2
fi
python -c "import torch, triton; print(torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(),
'| torch', torch.__version__, '| triton', triton.__version__)" | tee "$OUT/summary.txt"

for step in $STEPS; do
    case $step in
    tests)
        workers=()
        python -c "import xdist" >/dev/null 2>&1 && workers=(-n 8)
        run tests "${TESTS_S:-420}" python -m pytest "${workers[@]}" -q -rfE --tb=short -p no:cacheprovider \
            tests/test_triton_scan.py tests/test_triton_decode.py tests/test_slots.py tests/test_mix.py \
            tests/test_layer_fast_paths.py tests/test_fused_blocks.py tests/test_model_gpu.py \
            tests/test_conv.py tests/test_norm.py ;;
    layer)
        run layer "${LAYER_S:-240}" python tools/bench_layer.py --sections layer --skip fla --out "$OUT/layer.md"
        run layer_reference_stages "${LAYER_S:-240}" python tools/bench_layer.py --stages reference \
            --sections layer --skip fla,SDPA,GDN --out "$OUT/layer_reference_stages.md"
        run layer_lean "${LAYER_S:-240}" python tools/bench_layer.py --sections layer \
            --activation-memory lean --skip fla,SDPA,GDN --out "$OUT/layer_lean.md"
        has_fla && run layer_fla "${FLA_S:-600}" python tools/bench_layer.py --sections layer --fla-timing-only \
            --skip mom_lit,SDPA --out "$OUT/layer_fla.md" ;;
    model)
        run model "${MODEL_S:-300}" python tools/bench_layer.py --sections model --skip "fla,Llama,mom_lit GDN" \
            --out "$OUT/model.md"
        run model_lean "${MODEL_S:-300}" python tools/bench_layer.py --sections model \
            --activation-memory lean --skip "fla,Llama,mom_lit GDN,checkpointed" --out "$OUT/model_lean.md"
        has_fla && run model_fla "${FLA_S:-600}" python tools/bench_layer.py --sections model --fla-timing-only \
            --skip "mom_lit,Llama,fla Mom" --out "$OUT/model_fla.md" ;;
    compare)
        warm=""
        if has_fla && [ "$gpus" -ge 2 ]; then
            CUDA_VISIBLE_DEVICES=1 timeout "${FLA_S:-600}" python tools/bench_layer.py --sections layer,model \
                --fla-timing-only --skip "mom_lit,SDPA,Llama,Mom" --rep-ms 50 >"$OUT/compare_fla_warmup.log" 2>&1 &
            warm=$!
        fi
        CUDA_VISIBLE_DEVICES=0 run compare_ours "${LAYER_S:-240}" python tools/bench_layer.py --sections layer,model \
            --skip "fla,Llama,checkpointed" --rep-ms 300 --out "$OUT/compare_ours.md"
        CUDA_VISIBLE_DEVICES=0 run compare_ours_lean "${LAYER_S:-240}" python tools/bench_layer.py \
            --sections layer,model --activation-memory lean --skip "fla,Llama,checkpointed,SDPA,GDN" --rep-ms 300 \
            --out "$OUT/compare_ours_lean.md"
        [ -n "$warm" ] && wait "$warm"
        has_fla && CUDA_VISIBLE_DEVICES=0 run compare_fla "${FLA_S:-600}" python tools/bench_layer.py \
            --sections layer,model --fla-timing-only --skip "mom_lit,SDPA,Llama,Mom" --rep-ms 300 \
            --out "$OUT/compare_fla.md" ;;
    interleaved)
        fla_flag=()
        has_fla && fla_flag=(--fla-timing-only)
        run interleaved_layer "${FLA_S:-600}" python tools/bench_layer.py --sections layer --rounds 5 --rep-ms 300 \
            "${fla_flag[@]}" --skip "1 memory,MomAttention,SDPA" --out "$OUT/interleaved_layer.md"
        for graph in "" --cuda-graph; do
            run "interleaved_model${graph:+_graphed}" "${FLA_S:-600}" python tools/bench_layer.py --sections model \
                --rounds 5 --rep-ms 1000 --activation-memory fast,balanced "${fla_flag[@]}" $graph \
                --skip "GDN (,checkpointed,Llama,MomForCausalLM" --out "$OUT/interleaved_model${graph:+_graphed}.md"
        done ;;
    graphs)
        run graphs "${MODEL_S:-300}" python tools/bench_layer.py --sections model --cuda-graph \
            --skip "fla,Llama,checkpointed" --out "$OUT/graphs.md"
        has_fla && run graphs_fla "${FLA_S:-600}" python tools/bench_layer.py --sections model --cuda-graph \
            --fla-timing-only --skip "mom_lit,Llama,Mom" --out "$OUT/graphs_fla.md" ;;
    mixed)
        run mixed "${MODEL_S:-300}" python tools/bench_layer.py --sections model --mixed \
            --skip "fla,Llama,mom_lit GDN,checkpointed" --out "$OUT/mixed.md"
        run mixed_lean "${MODEL_S:-300}" python tools/bench_layer.py --sections model --mixed \
            --activation-memory lean --skip "fla,Llama,mom_lit GDN,checkpointed" --out "$OUT/mixed_lean.md"
        has_fla && run mixed_fla "${FLA_S:-600}" python tools/bench_layer.py --sections model --mixed \
            --fla-timing-only --skip "mom_lit,Llama,fla Mom" --out "$OUT/mixed_fla.md" ;;
    stages)
        run stages "${STAGES_S:-300}" python tools/bench_stages.py --out "$OUT/stages.md" ;;
    profile)
        run profile "${PROFILE_S:-300}" python tools/bench_layer.py --sections profile,profile_model \
            --skip "fla,SDPA,Llama,GDN" --profile-out "$OUT/profile.txt" ;;
    devicetime)
        for shape in 8x2048 2x8192; do
            run "devicetime_ours_$shape" "${PROFILE_S:-300}" python tools/bench_layer.py --sections profile \
                --profile-shape "$shape" --skip "fla,SDPA,Mom,1 memory" --profile-json "$OUT/devicetime.json" \
                --profile-out "$OUT/devicetime_profiles.txt"
            has_fla && run "devicetime_fla_$shape" "${FLA_S:-600}" python tools/bench_layer.py --sections profile \
                --profile-shape "$shape" --fla-timing-only --skip "mom_lit,SDPA,Mom" \
                --profile-json "$OUT/devicetime.json" --profile-out "$OUT/devicetime_profiles.txt"
        done
        python tools/bench_layer.py --summarize-profiles "$OUT/devicetime.json" | tee "$OUT/devicetime.md" ;;
    against)
        if [ -z "${BASE:-}" ] || [ ! -f "${BASE:-}/tools/bench_layer.py" ]; then
            echo "against: BASE must name another checkout of mom_lit (got '${BASE:-}')" | tee -a "$OUT/summary.txt"
            status=1
            continue
        fi
        base=$(cd "$BASE" && pwd)
        mkdir -p "$OUT/against"
        # tree_run TREE LABEL NAME ARGS...: bench_layer.py of TREE (its package first on the path) from TREE's folder
        tree_run() {
            local tree=$1 label=$2 name=$3 here=$PWD
            shift 3
            cd "$tree" || return
            PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" run "against/${label}_$name" "${PROFILE_S:-300}" \
                python tools/bench_layer.py --activation-memory fast,balanced "$@"
            cd "$here" || return
        }
        # by measurement, then tree (base and this alternate, the order flipping every round), so that a run cut
        # short still holds both trees of what it measured
        for round in $(seq "${ROUNDS:-2}"); do
            order="$base $PWD"
            [ $((round % 2)) -eq 0 ] && order="$PWD $base"
            for what in profile model_graphed model; do
                [ "$round" -gt 1 ] && [ "$what" != profile ] && continue
                for tree in $order; do
                    label=this
                    [ "$tree" = "$base" ] && label=base
                    case $what in
                    profile) tree_run "$tree" "$label" "r${round}_profile" --sections profile --profile-shape 8x2048 \
                        --skip "fla,SDPA,Mom,1 memory" --profile-json "$OUT/against/${label}_r${round}_profile.json" \
                        --profile-out "$OUT/against/${label}_profiles.txt" ;;
                    model_graphed) tree_run "$tree" "$label" r1_model_graphed --sections model --rounds 3 \
                        --rep-ms 1000 --cuda-graph --skip "GDN,checkpointed,Llama,fla" \
                        --out "$OUT/against/${label}_r1_model_graphed.md" ;;
                    model) tree_run "$tree" "$label" r1_model --sections model --rounds 3 --rep-ms 1000 \
                        --skip "GDN,checkpointed,Llama,fla" --out "$OUT/against/${label}_r1_model.md" ;;
                    esac
                done
            done
        done
        python tools/compare_trees.py "$OUT/against" | tee "$OUT/against.md" ;;
    decode)
        run decode "${DECODE_S:-420}" python tools/bench_decode.py --json "$OUT/decode.json" ;;
    interop)
        if has_fla; then
            run interop "${INTEROP_S:-600}" python tools/verify_fla_interop.py --no-fla-generate
        else
            echo "interop: skipped, fla is not importable" | tee -a "$OUT/summary.txt"
        fi ;;
    scale)
        if [ "$gpus" -lt 2 ]; then
            echo "scale: skipped, needs 2 GPUs ($gpus visible)" | tee -a "$OUT/summary.txt"
        else
            run scale "${SCALE_S:-1500}" python tools/scale_runs.py --out "$OUT/scale" --timeout 360
        fi ;;
    *)
        echo "unknown step '$step' ($ALL_STEPS)" >&2
        exit 2 ;;
    esac
done
echo "summary: $OUT/summary.txt"
exit $status
