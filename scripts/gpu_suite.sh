#!/usr/bin/env bash
# The GPU measurements, one step per device call, so that calls can follow each other without
# thinking time (the machine goes cold after 30 s idle). Run on the GPU machine from the
# repository root after the staging of scripts/device_stage.sh (call 4 sources install.sh):
#     KOALA_COMMIT=<sha> bash scripts/gpu_suite.sh <step> [args]
# Every step writes its result files and a log to $OUT (default: bench/results) and prints a
# short tail. Steps and their rough wall time on the H100:
#   check              GPU tests (-m gpu) and the PDL chain check                      ~3 min
#   plain              bench.vanilla with PDL on and off and with the attention's     ~3 min
#                      separate combine launch, linear kernels, profiles
#   cost               bench.spec_cost (K = 1..4, fused and unfused) and bench.scale   ~3 min
#   mtbench            shipped heads, greedy, chain and tree, transformers peers        ~5 min
#   sampling <kind>    shipped <eagle|medusa> head at T = 0.7 and 1.0, chain and tree  ~5 min
#   ablation-train <steps> <names>   train.ablation --only <names> (comma-separated)
#                      on runs/data/sharegpt-sd (carry it; python -m train.selfdistill makes it)
#   ablation-train-par <steps> <names>  the same, one process per head, all sharing the GPU at
#                      once (timings then measure a shared GPU: recorded as concurrent_trainings)
#   ablation-eval <names>            MT-bench, chain, greedy, of those trained heads
#   selfdistill <limit>  self-distil the first <limit> ShareGPT conversations into /tmp/sd   ~2 min
#                      (16,000: ~8 min on the H100), and return the finished set under $OUT/sd
#   launches           needs no staged model (random SmolLM2-shaped weights): the GPU tests of the
#                      fused q|k|v+RoPE launch and the row tiles, then bench.scale on SmolLM2's
#                      shape with KOALA_FUSED_ROPE=0 and 1 (plain step and iteration costs)   ~5 min
#   rows               bench/linear_rows.py: per-row GEMV and row-tile sweep at M = 1..8, then
#                      bench.scale on SmolLM2's shape with its tiles (KOALA_EXACT_TILES) and
#                      without (KOALA_EXACT_TILES=none; random weights, no staged model)    ~7 min
#   batch              bench.batch: generate_batch at B = 1, 2, 4, 8, plain and shipped heads,
#                      then plain and EAGLE at B = 1, 8 with KOALA_BATCH_PIPELINE=1        ~5 min
#   draft-exact        needs no staged model: bench.spec_cost of EAGLE chains (depth 1 and 4,
#                      K = 1..4) with the draft in exact mode and out of it, twice        ~4 min
#   oproj-combine      needs no staged model: the GPU tests of the attention's combine in the
#                      output projection (KOALA_OPROJ_COMBINE), then bench.spec_cost of EAGLE
#                      chains (depth 1 and 4, K = 1..4) with it off and on, twice           ~5 min
#   layer-share        needs no staged model: bench.layer_share, twice: one target layer's cost
#                      (plain step, depth-1 verify) against an EAGLE draft layer's            ~3 min
#   vec                bench/linear_rows.py --no-gemv: the row tiles (R = 2, 4) alone        ~5 min
#   fused-tree         needs no staged model: GPU tests of kernels/topk.py, kernels/tree_draft.py
#                      and the decoder's trees, then bench.spec_cost of greedy EAGLE trees (16,
#                      32, 64 nodes, K = 1, 3) with KOALA_FUSED_TREE=0 and 1, twice, and kernel
#                      profiles of a tree-32 draft each way                                 ~5 min
#   exact-trees        GPU tests of exact trees and of Qwen3 / Phi-3, then MT-bench trees of the
#                      shipped EAGLE head with KOALA_EXACT_TREES=1 and 0                    ~8 min
#   vocab <kind> [depths] [vocabs]  MT-bench of the shipped <eagle|medusa> head, chains of the
#                      given depths (default 1), one method per draft vocabulary (default
#                      none,4096,8192,16384)                                                ~4 min
# The MT-bench steps' time budgets leave 40 s (80 s for sampling, two temperatures) more than before for bench.mtbench's closing plain
# run (--plain-every, default 2), which runs even past the budget, inside the 600 s call limit.
set -euo pipefail
: "${KOALA_COMMIT:?set KOALA_COMMIT to the commit being measured}"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export OUT
step="${1:?step: check|plain|cost|mtbench|sampling|selfdistill|ablation-train|ablation-train-par|ablation-eval|launches|rows|vec|batch|vocab|exact-trees|draft-exact|oproj-combine|layer-share|fused-tree}"
shift
log="$OUT/suite_${step}.log"
quiet() { grep -v -i -e warning -e "^\s*$" "$@" || true; }
# train.ablation's settings, shared by ablation-train and ablation-train-par: ablation_args <steps>
# KOALA_TRAIN_DATA (default runs/data/sharegpt-sd, or the set the selfdistill step wrote) and
# KOALA_TRAIN_LR (default: train.ablation's, 5e-4) override the data and the learning rate;
# KOALA_TRAIN_TAG names a variant recipe (train.ablation --tag), KOALA_TRAIN_ARGS adds options
# (e.g. "--disc-input prob"), word-split; KOALA_TRAIN_BUDGET: seconds (default 540). The tag
# starts with a dash (-prob), hence --tag=...
ablation_args() {  # shellcheck disable=SC2086 (KOALA_TRAIN_ARGS is word-split on purpose)
  ablation_args=(--data "${KOALA_TRAIN_DATA:-runs/data/sharegpt-sd}" --out /tmp/ablation --steps "$1" --batch-size 16
                 --ckpt-every 1000 --eval-every 1000 --time-budget "${KOALA_TRAIN_BUDGET:-540}" --no-progress
                 ${KOALA_TRAIN_LR:+--lr "$KOALA_TRAIN_LR"} ${KOALA_TRAIN_TAG:+"--tag=$KOALA_TRAIN_TAG"}
                 ${KOALA_TRAIN_ARGS:-})
}

# alternate_cost VAR NAME A B: bench.spec_cost of EAGLE chains (depth 1 and 4, K = 1..4, random
# weights) with VAR=A, then VAR=B, twice, into spec_cost_<NAME><value>_rep<1|2>.json
alternate_cost() {
  for rep in 1 2; do
    for v in "$3" "$4"; do
      env "$1=$v" python -m bench.spec_cost --random-weights --kinds eagle --ks 1,2,3,4 \
          --depths 1,4 --trees "" --out "spec_cost_$2${v}_rep$rep.json" >> "$log" 2>&1
    done
  done
  quiet "$log" | grep -e "plain" -e "chain" | tail -n 40
}

case "$step" in
  check)
    python -m pytest -q -m gpu tests/ -p no:cacheprovider > "$log" 2>&1 || true
    python -m kernels.pdl_check >> "$log" 2>&1 || true
    tail -n 12 "$log"
    ;;
  plain)
    KOALA_PDL=0 python -m bench.vanilla > "$log" 2>&1
    mv "$OUT/vanilla.json" "$OUT/vanilla_pdl_off.json"
    KOALA_FUSED_COMBINE=0 python -m bench.vanilla >> "$log" 2>&1
    mv "$OUT/vanilla.json" "$OUT/vanilla_combine_launch.json"
    python -m bench.vanilla >> "$log" 2>&1
    python bench/linear_bench.py --only smollm2 --ms 1,2,4,5,8 >> "$log" 2>&1
    { python -m bench.profile_step
      python -m bench.profile_step --spec eagle --layers 2 --mode chain --depth 4
      python -m bench.profile_step --spec eagle --layers 2 --mode tree; } > "$OUT/profile_step.txt" 2>&1
    quiet "$log" | tail -n 20; grep "==" "$OUT/profile_step.txt"
    ;;
  cost)
    python -m bench.spec_cost --unfused > "$log" 2>&1
    python -m bench.scale >> "$log" 2>&1
    quiet "$log" | tail -n 30
    ;;
  mtbench)
    python -m bench.mtbench --modes chain,tree --peer-questions 3 --time-budget 440 --no-progress \
        --out mtbench.json > "$log" 2>&1
    quiet "$log" | tail -n 10
    ;;
  sampling)
    kind="${1:?sampling needs eagle or medusa}"
    python -m bench.mtbench --heads "koala/default_heads/$kind" --modes chain,tree --temperatures 0.7,1.0 \
        --seed 0 --time-budget 340 --no-progress --out "mtbench_sampling_$kind.json" > "$log" 2>&1
    quiet "$log" | tail -n 8
    ;;
  ablation-train)
    steps="${1:?ablation-train needs the steps per head}"; names="${2:?and the head names}"
    ablation_args "$steps"
    python -m train.ablation "${ablation_args[@]}" --only "$names" > "$log" 2>&1
    cp /tmp/ablation/ablation.json "$OUT/ablation_$(echo "$names" | tr ',' '_').json"
    quiet "$log" | tail -n 14
    ;;
  ablation-train-par)
    steps="${1:?ablation-train-par needs the steps per head}"; names="${2:?and the head names}"
    ablation_args "$steps"
    n_par=${KOALA_CONCURRENT:-$(echo "$names" | tr ',' '\n' | grep -c .)}   # KOALA_CONCURRENT: when other trainings share the GPU too
    mkdir -p /tmp/ablation
    pids=()
    tag="${KOALA_TRAIN_TAG:-}"
    for n in $(echo "$names" | tr ',' ' '); do
      python -m train.ablation "${ablation_args[@]}" --only "$n" \
          --concurrent "$n_par" --table "/tmp/ablation/table_$n$tag.json" > "$log.$n$tag" 2>&1 &
      pids+=($!)
    done
    rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    python - "$OUT/ablation_$(echo "$names" | tr ',' '_')$tag.json" "$tag" $(echo "$names" | tr ',' ' ') <<'PY'
import json, sys
out, names = sys.argv[1], [n + sys.argv[2] for n in sys.argv[3:]]   # argv[2]: the tag
table = {}
for n in names:
    try:
        table.update(json.load(open(f"/tmp/ablation/table_{n}.json")))
    except FileNotFoundError:
        print(f"{n}: no table (the process failed; see its log)")
json.dump(table, open(out, "w"), indent=2)
for n, r in table.items():
    print(n, r["status"], r["step"], f"peak {r.get('peak_gpu_gib_of_invocation') or 0:.1f} GiB", f"{r['train_seconds']:.0f} s", f"{r['tokens_per_s']:.0f} tok/s",
          [round(x, 3) for x in (r.get("final_eval") or {}).get("eval/top1", [])])
PY
    for n in $(echo "$names" | tr ',' ' '); do quiet "$log.$n$tag" | tail -n 3; done
    exit "$rc"
    ;;
  selfdistill)
    # re-answer the first <limit> prepared ShareGPT conversations with the target; 8,192 took 95 s
    # on the H100. Carry their prompts, runs/data/sharegpt-prompts (3.9 MB; made here by
    # python -m train.selfdistill --data runs/data/sharegpt --prompts-out runs/data/sharegpt-prompts):
    # the whole set (28 MB) and the repository do not fit one call's 64 MiB. KOALA_SD_DATA names
    # another source. Then KOALA_TRAIN_DATA=/tmp/sd for training.
    limit="${1:?selfdistill needs the number of conversations}"
    python -m train.selfdistill --data "${KOALA_SD_DATA:-runs/data/sharegpt-prompts}" --out /tmp/sd --batch-size 512 --max-new 384 \
        --limit "$limit" --time-budget 520 > "$log" 2>&1
    # a finished shard set comes back whole (6 .npy files and meta.json, each under the 16 MiB a
    # returned file may have: uint16 tokens; with the log, the 8 files a call may return), so
    # later sessions carry runs/data/sharegpt-sd instead of regenerating it: copy files_at/sd/*
    # there. An unfinished one (run the step again to continue) returns its meta.json only.
    if [ -f /tmp/sd/train.tokens.npy ]; then
      mkdir -p "$OUT/sd"
      cp /tmp/sd/*.npy /tmp/sd/meta.json "$OUT/sd/"
    else
      cp /tmp/sd/meta.json "$OUT/selfdistill_meta.json" 2>/dev/null || true
    fi
    quiet "$log" | grep -v -e GGUF -e "Loading weights" | tail -n 12
    ;;
  ablation-eval)
    names="${1:?ablation-eval needs the head names}"
    heads=$(echo "$names" | tr ',' '\n' | sed 's|^|/tmp/ablation/|; s|$|/head|' | paste -sd, -)
    # shellcheck disable=SC2086 (KOALA_EVAL_ARGS, e.g. "--depths 1,3", is word-split on purpose)
    python -m bench.mtbench --heads "$heads" --modes chain --time-budget "${KOALA_EVAL_BUDGET:-470}" --no-progress ${KOALA_EVAL_ARGS:-} \
        --out "mtbench_ablation_$(echo "$names" | tr ',' '_').json" > "$log" 2>&1
    quiet "$log" | tail -n 10
    ;;
  launches)
    python -m pytest -q tests/kernels/test_linear_rope.py tests/kernels/test_linear.py -k "rope or row_tile" \
        -p no:cacheprovider > "$log" 2>&1 || true
    python -m pytest -q -m gpu tests/test_speculative.py -k "fused_rope or exact_mode" -p no:cacheprovider \
        >> "$log" 2>&1 || true
    for r in 0 1; do
      KOALA_FUSED_ROPE=$r python -m bench.scale --preset smollm2-135m --quick \
          --out "scale_smollm2_fused_rope$r.json" >> "$log" 2>&1
    done
    quiet "$log" | grep -e passed -e failed -e "plain step" -e "chain N=  2" -e "tree"
    ;;
  rows)
    python bench/linear_rows.py --rows 1,2,4 --budget 300 > "$log" 2>&1
    KOALA_EXACT_TILES="$OUT/linear_rows.json" python -m bench.scale --preset smollm2-135m --quick \
        --out scale_smollm2_tiles.json >> "$log" 2>&1
    KOALA_EXACT_TILES=none python -m bench.scale --preset smollm2-135m --quick --out scale_smollm2_exact.json >> "$log" 2>&1
    quiet "$log" | grep -e "^M" -e "^tile" -e "plain step" -e "chain N=  2" | tail -n 40
    ;;
  batch)
    # generate_batch throughput (needs the staged model): plain and the shipped heads, B = 1..8
    python -m bench.batch --batches 1,2,4,8 --prompts 8 --new-tokens 128 > "$log" 2>&1
    # and with the batch's iterations pipelined (KOALA_BATCH_PIPELINE=1, opt-in until timed)
    KOALA_BATCH_PIPELINE=1 python -m bench.batch --heads none,eagle --batches 1,8 --eager "" --prompts 8 \
        --new-tokens 128 --out batch_pipelined.json >> "$log" 2>&1
    quiet "$log" | grep -v -e GGUF -e "Loading weights" | tail -n 20
    ;;
  vocab)
    # draft vocabularies (the head's most frequent tokens only): MT-bench, greedy, chains, one
    # method per vocabulary size and depth, plain decoding bracketing them
    kind="${1:?vocab needs eagle or medusa}"; depths="${2:-1}"; vocabs="${3:-none,4096,8192,16384}"
    python -m bench.mtbench --heads "koala/default_heads/$kind" --modes chain --depths "$depths" \
        --draft-vocabs "$vocabs" --time-budget "${KOALA_EVAL_BUDGET:-420}" --no-progress \
        --out "mtbench_vocab_${kind}_d${depths//,/}.json" > "$log" 2>&1
    quiet "$log" | grep -v -e GGUF -e "Loading weights" | tail -n 12
    ;;
  exact-trees)
    # exact trees (KOALA_EXACT_TREES=1) and the Qwen3 / Phi-3 CUDA path: their GPU tests, then
    # MT-bench trees of the shipped EAGLE head with and without exact trees (identical_to_plain
    # should be 1.0 with them; the cost of the per-row GEMV verify shows in verify_ms_per_iter)
    python -m pytest -q -m gpu tests/test_speculative.py -k "exact_trees or new_architectures" \
        -p no:cacheprovider > "$log" 2>&1 || true
    for e in 1 0; do
      KOALA_EXACT_TREES=$e python -m bench.mtbench --heads koala/default_heads/eagle --modes tree \
          --tree-depths 5 --tree-size 32 --time-budget 150 --no-progress \
          --out "mtbench_exact_trees$e.json" >> "$log" 2>&1
    done
    quiet "$log" | grep -v -e GGUF -e "Loading weights" | tail -n 16
    ;;
  oproj-combine)
    # the split attention's combine in the output projection's prologue (KOALA_OPROJ_COMBINE=1,
    # opt-in) against its own launch (0): bit-equality tests, then the per-layer draft cost
    # and the plain step, alternating, twice (random weights, no staged model)
    python -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_tree_attention.py \
        tests/test_speculative.py -k "combine or window" > "$log" 2>&1 || true
    tail -n 3 "$log"
    alternate_cost KOALA_OPROJ_COMBINE oproj_combine 0 1
    ;;
  draft-exact)
    # the EAGLE draft in and out of exact mode (KOALA_DRAFT_EXACT=1 / 0), alternating, twice:
    # per-layer draft cost against K (random weights, no staged model)
    alternate_cost KOALA_DRAFT_EXACT draft_exact 1 0
    ;;
  layer-share)
    # one target layer's cost (slope over 6..30-layer random SmolLM2 shapes, plain step and
    # depth-1 verify) against an EAGLE draft layer's, twice (random weights, no staged model)
    for rep in 1 2; do
      python -m bench.layer_share --out "layer_share_rep$rep.json" >> "$log" 2>&1
    done
    quiet "$log" | tail -n 16
    ;;
  fused-tree)
    # greedy EAGLE trees: the fused levels and rerank (KOALA_FUSED_TREE=1, opt-in until timed)
    # against the PyTorch levels (0), alternating, twice (random weights, no staged model)
    { python -m pytest -q -p no:cacheprovider tests/kernels/test_topk.py tests/kernels/test_tree_draft.py
      python -m pytest -q -m gpu -p no:cacheprovider tests/test_speculative.py -k tree; } > "$log" 2>&1 || true
    grep -e passed -e failed "$log"
    for rep in 1 2; do
      for v in 0 1; do
        KOALA_FUSED_TREE=$v python -m bench.spec_cost --random-weights --kinds eagle --ks 1,3 --depths 1 \
            --trees 16,32,64 --out "spec_cost_fused_tree${v}_rep$rep.json" >> "$log" 2>&1
      done
    done
    quiet "$log" | grep -e "plain" -e "tree" | tail -n 30
    for v in 0 1; do
      echo "#### KOALA_FUSED_TREE=$v"
      KOALA_FUSED_TREE=$v python -m bench.profile_step --random-weights --rows 25 --spec eagle --layers 1 \
          --mode tree --tree-size 32 --top-k 8 2>&1 | quiet
    done > "$OUT/profile_fused_tree.txt"
    grep -e "==" -e "####" "$OUT/profile_fused_tree.txt"
    ;;
  vec)
    # the row tiles alone (the rows step's budget runs out on the per-row GEMV before them)
    python bench/linear_rows.py --no-gemv --rows 2,4 --budget 300 > "$log" 2>&1
    mv "$OUT/linear_rows.json" "$OUT/linear_rows_vec.json"
    quiet "$log" | grep -e "^M" -e "^tile" | tail -n 30
    ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
