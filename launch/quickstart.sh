#!/usr/bin/env bash
# The demo, on a CPU in about 3 minutes (2 cores): set up .venv, then the whole life of a model
# on the embedded sample corpus: tokenize it once, pretrain the `tiny` preset (9 M parameters)
# with 2 processes through the deepspeed launcher and the same script a GPU cluster uses
# (launch/train.sh) as 2 pipeline stages on gloo, a preemption half-way (SIGTERM -> checkpoint ->
# exit 0), the relaunch under ZeRO-3 instead (only the DeepSpeed JSON changes) resuming from the
# pipeline's checkpoint, evaluation on a held-out shard, export to a Hugging Face folder, loading
# it in transformers and generating from it.
#
#   bash launch/quickstart.sh          STEPS=300 STOP_AT=150 to change the plan
#
# Its output: runs/quickstart/ (checkpoints, metrics.jsonl, the full log in quickstart.log).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# CPU: DeepSpeed on gloo, one thread per rank (2 ranks on 2 cores; more threads per rank made
# steps ~100x slower), wandb offline (into the output folder).
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
# shellcheck disable=SC1091
. .venv/bin/activate

STEPS=${STEPS:-300}
STOP_AT=${STOP_AT:-150}
OUT=runs/quickstart
LOG=$OUT/quickstart.log
bold="" plain=""
if [ -t 2 ]; then bold=$'\033[1m' plain=$'\033[0m'; fi
phase() { printf '\n%s[quickstart] %s%s\n' "$bold" "$*" "$plain" >&2; }
die() { echo "[quickstart] error: $*" >&2; exit 1; }
[ "$STOP_AT" -lt "$STEPS" ] || die "STOP_AT ($STOP_AT) must be below STEPS ($STEPS)"

# launch/train.sh reads its settings from these variables; on a cluster the defaults are the
# argonne2 model, bf16, the Common Crawl shards and a hostfile.
export HOSTFILE="" NUM_GPUS=2         # this machine only, 2 processes (CPU "GPUs")
# A port that is free now (a fixed one may be taken, e.g. by a test run).
MASTER_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
export MASTER_PORT
export DS_LAUNCHER_ARGS="--log_level warning"
# The run itself (model, data, schedule, output) is a run config file; the two flags below
# override it (the same precedence a user gets: defaults < file < flags).
RUN=launch/configs/quickstart.yaml
[ "$OUT" = "$(python -c "import yaml; print(yaml.safe_load(open('$RUN'))['checkpoint']['output_dir'])")" ] \
    || die "$RUN must write to $OUT"
export MAX_STEPS=$STEPS SAMPLE_INTERVAL=$STEPS
CONFIG_2=ds_configs/cpu_zero3.json

NOISE='^SEED_LAYERS=|^Using topology|^stage=[0-9]|^ +[0-9]+: [A-Za-z]+$|^  loss: |lr_schedules.py'
NOISE+='|fetch_hostfile|^wandb: |FutureWarning: `torch.distributed|^  return func\(|^Processing zero'
NOISE+='|^Parsing checkpoint created|^Detected checkpoint of type|^Reconstructed Trainable'
show() { tee -a "$LOG" | grep --line-buffered -vE "$NOISE" >&2 || true; }

start=$(date +%s)
rm -rf "$OUT"  # a fresh run each time (the token cache is kept)
mkdir -p "$OUT"

phase "1/5 The real model: argonne2, its parameters and training memory on 8 or 16 GPUs"
argonne-ds model-info --preset argonne2 --gpus 8 16

phase "2/5 Tokenize the sample corpus once (shards 1-11): no --tokenizer-path, so a byte-level" \
    "BPE is trained on the data first; the token cache makes later runs start at once"
argonne-ds prepare --config "$RUN" 2>&1 | show

phase "3/5 Train the tiny model ($RUN) on 2 processes (pipeline stages 1 and 2) through the deepspeed launcher." \
    "At step $STOP_AT this script sends SIGTERM, as a cluster does before preempting a job:" \
    "the job saves a checkpoint and exits 0. (An untrained model scores ln(32000) = 10.4.)"
bash launch/train.sh "$RUN" > >(show) 2>&1 &
train_pid=$!
# Stop when metrics.jsonl records step STOP_AT (the job logs every step there).
until grep -qF "{\"step\": $STOP_AT, \"loss\"" "$OUT/metrics.jsonl" 2>/dev/null; do
    if ! kill -0 "$train_pid" 2>/dev/null; then
        wait "$train_pid" || true
        die "training ended before step $STOP_AT; see $LOG"
    fi
    sleep 0.5
done
kill -TERM "$train_pid"
wait "$train_pid" || die "the interrupted run did not exit cleanly; see $LOG"
sleep 0.5  # let the output filter catch up

phase "4/5 Relaunch with --deepspeed_config $CONFIG_2: ZeRO-3, nothing else changed (the" \
    "global batch stays 8: accumulation follows the 2 data-parallel ranks). It finds the" \
    "pipeline's checkpoint, converts it (weights, Adam moments, learning-rate schedule, data" \
    "position) and continues; it evaluates on held-out shard_12 every 100 steps and" \
    "ends with a greedy sample (a 9 M model after a few minutes mostly repeats frequent words)"
bash launch/train.sh "$RUN" --deepspeed_config "$CONFIG_2" > >(show) 2>&1 \
    || die "the resumed run failed; see $LOG"
sleep 0.5

phase "5/5 Export the ZeRO-3 checkpoint to a Hugging Face folder, load it with transformers" \
    "(no trust_remote_code) and generate from it"
argonne-ds export --checkpoint "$OUT" --out "$OUT/hf" --dtype fp32 2>&1 | show
python - "$OUT/hf" 2>&1 <<'EOF' | show
import sys

from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(f"[quickstart] transformers loaded {type(model).__name__} "
      f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) from {sys.argv[1]}")
EOF
argonne-ds generate --model-path "$OUT/hf" --prompt "And God said" --max-new-tokens 24 \
    2>&1 | show

phase "Done in $(($(date +%s) - start)) s"
python - "$OUT/metrics.jsonl" <<'EOF'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
steps = sorted(loss)
first = sum(loss[s] for s in steps[:10]) / 10
last = sum(loss[s] for s in steps[-20:]) / 20
print(f"[quickstart] training loss {first:.2f} (mean of steps 1-10) -> {last:.2f} (mean of the "
      f"last 20 steps); held-out loss " + " -> ".join(f"{v:.2f} (step {s})" for s, v in evals))
print("[quickstart] next: docs/scaling-out.md 'Launching' for GPU clusters (launch/train_pipeline.sh, "
      "launch/train_zero3.sh, launch/slurm.sbatch)")
if not last < 0.75 * first:
    sys.exit("[quickstart] the loss did not fall: something is wrong")
EOF
