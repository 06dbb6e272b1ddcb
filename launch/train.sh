#!/usr/bin/env bash
# `argonne-ds train` under the deepspeed launcher. The one body behind launch/train_pipeline.sh
# and launch/train_zero3.sh, which differ only in the DeepSpeed JSON they hand it:
#
#   bash launch/train.sh DS_CONFIG [argonne-ds train flags ...]
#   bash launch/train.sh RUN_CONFIG.yaml [argonne-ds train flags ...]
#
# With a run config (a .yaml/.yml file, e.g. launch/configs/argonne2_pipeline.yaml) the file
# holds the run: the variables below have no defaults then, and only those you set become flags
# (which override the file's values), like the flags given after the file.
# It runs in the repository root, so relative paths (the defaults below and any you pass) are
# relative to the root. Each train flag takes its default from an environment variable; flags
# given after DS_CONFIG come last and win (argparse keeps the last value of a repeated flag).
# A variable set to the empty string leaves its flag out (argonne-ds's or the JSON's default).
#
#   MODEL=argonne2             preset or model JSON
#   DATA_GLOB='../data/CC-MAIN-2025-26/*.parquet'   one or more globs, space-separated
#   TOKENIZER_PATH=...         local HF tokenizer folder (Qwen2.5); required, or "fallback" to
#                              train a byte-level BPE on the data (demos, smoke tests)
#   CACHE_DIR=.argonne_cache   token cache; on several nodes it must be on a shared filesystem
#   OUTPUT_DIR=runs/<model>-<config>   checkpoints (resumed from automatically), metrics
#   BLOCK_SIZE=4096  PRECISION=bf16 (bf16|fp16|fp32)  MAX_STEPS=100000 (or MAX_TOKENS=...)
#   LR=3e-4  MIN_LR=3e-5  WARMUP_STEPS=2000  SAVE_INTERVAL=500  CHECKPOINT_KEEP=3
#   LOG_INTERVAL=10  BATCH_SIZE, GRAD_ACCUM (default: the JSON's)  SHUFFLE_WINDOW  SEED
#   EVAL_DATA_GLOB (held-out shards)  EVAL_INTERVAL=1000  SAMPLE_INTERVAL  SAMPLE_PROMPT
#   OMP_NUM_THREADS=4          CPU threads per rank (the launcher never sets it)
#   MAX_RESTARTS=3  RESTART_DELAY=5   relaunches after a crash, a hang or an out-of-memory error
#                              (exit 1, 75 or a signal), each resuming from the last checkpoint;
#                              not after exit 2 (bad input), 3 (does not fit), 4 (bad steps)
#                              or 5 (disk full, quota, read-only); exit 76 (a phase changes the
#                              context: docs/long_context.md) relaunches at once, uncounted
#
# How the processes start:
#   HOSTFILE (default launch/hostfile, see hostfile.example) and NODE_RANK unset: the launcher
#     starts every node over ssh (pdsh). Remote ranks do NOT inherit this shell's environment:
#     DeepSpeed forwards only the variables written in a .deepspeed_env file (read from $HOME and
#     from the current directory; DS_ENV_FILE renames it) and those whose names start with a
#     prefix of its runner.py EXPORT_ENVS (PYTHON, MLFLOW, MV2, UCX; NCCL on CUDA). So this
#     script first writes the variables training reads (FORWARD_ENV below: WANDB_*, HF_*,
#     NCCL_*, TORCH_*, ...) into ./.deepspeed_env. MASTER_ADDR: DeepSpeed asks the first host.
#   NODE_RANK=k: start node k of HOSTFILE only (--no_ssh). Run one launcher per node with the
#     same HOSTFILE, MASTER_ADDR (default: the first host) and MASTER_PORT; slurm.sbatch does it
#     with srun. No ssh, and each node keeps its own environment.
#   HOSTFILE= (empty): this machine only, NUM_GPUS processes (default: all GPUs).
#   DS_LAUNCHER_ARGS: more launcher flags, split on spaces (e.g. "--log_level warning").
#
# Stopping: SIGTERM or SIGUSR1 to this script asks the ranks (with SIGUSR1) to finish the step,
# save a checkpoint and exit 0; launching again resumes from it; a second signal stops at once.
# The launcher processes ignore SIGUSR1, so a SIGUSR1 sent to every process of the job (Slurm's
# --signal) works too. Ctrl-C in a terminal reaches every process and aborts, as with plain
# deepspeed; so does any stop in the ssh mode, where the ranks are remote. Either way the next
# launch resumes from the last periodic checkpoint (--save-interval).
set -euo pipefail

die() { echo "launch/train.sh: error: $*" >&2; exit 2; }
say() { echo "[launch] $*" >&2; }

# Variables forwarded to ssh-started nodes (prefixes; FORWARD_ENV_EXTRA adds more). Secrets
# (WANDB_API_KEY, HF_TOKEN, ...) are left out on purpose: they would sit in a file and on pdsh's
# command line, where other users' `ps` sees them. Run `wandb login` once instead (~/.netrc on
# the shared home) and keep the Hugging Face token in HF_HOME.
FORWARD_ENV="WANDB_ HF_ TRANSFORMERS_ TOKENIZERS_PARALLELISM TORCH_ PYTORCH_ NCCL_ TRITON_
CUDA_DEVICE_MAX_CONNECTIONS CUDA_LAUNCH_BLOCKING OMP_NUM_THREADS DS_ACCELERATOR ARGONNE_ FI_
${FORWARD_ENV_EXTRA:-}"

[ $# -ge 1 ] || die "usage: launch/train.sh DS_CONFIG|RUN_CONFIG.yaml [argonne-ds train flags ...]"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case $1 in
    *.yaml | *.yml)  # a run config: it carries the defaults, D="" switches ours off
        RUN_CONFIG=$1 DS_CONFIG="" D=""
        [ -f "$RUN_CONFIG" ] || die "run config $RUN_CONFIG not found (see launch/configs/)" ;;
    *)
        RUN_CONFIG="" DS_CONFIG=$1 D=1
        [ -f "$DS_CONFIG" ] || die "DeepSpeed config $DS_CONFIG not found (see ds_configs/)" ;;
esac
shift

# The repository's .venv (launch/setup_env.sh) unless a virtualenv is already active.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
command -v deepspeed >/dev/null || die "no deepspeed command: run launch/setup_env.sh first"

# True when the pass-through flags already hold one of the given flags.
has_flag() {
    local arg want
    for arg in "${passthrough[@]}"; do
        for want in "$@"; do
            if [ "${arg%%=*}" = "$want" ]; then return 0; fi
        done
    done
    return 1
}
passthrough=("$@")

# ---- the argonne-ds train flags ---------------------------------------------------------------
# ${VAR-${D:+default}}: the default only without a run config.
MODEL=${MODEL-${D:+argonne2}}
if [ -n "$D" ]; then
    OUTPUT_DIR=${OUTPUT_DIR-runs/$(basename "${MODEL:-model}" .json)-$(basename "$DS_CONFIG" .json)}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# `read -a` splits on spaces without expanding the globs: argonne-ds expands them itself.
read -r -a data_globs <<< "${DATA_GLOB-${D:+../data/CC-MAIN-2025-26/*.parquet}}"
read -r -a eval_globs <<< "${EVAL_DATA_GLOB:-}"

train=()
add() {  # add FLAG VALUE: only when VALUE is not empty
    if [ -n "$2" ]; then train+=("$1" "$2"); fi
}
add --config "$RUN_CONFIG"
add --deepspeed_config "$DS_CONFIG"
add --model "$MODEL"
if [ ${#data_globs[@]} -gt 0 ]; then train+=(--data-glob "${data_globs[@]}"); fi
if [ -n "$RUN_CONFIG" ]; then
    if [ -n "${TOKENIZER_PATH:-}" ] && [ "$TOKENIZER_PATH" != fallback ]; then
        train+=(--tokenizer-path "$TOKENIZER_PATH")
    fi
elif ! has_flag --tokenizer-path; then
    case ${TOKENIZER_PATH:-} in
        "") die "set TOKENIZER_PATH to a local Hugging Face tokenizer folder (Qwen2.5, e.g." \
                "/models/Qwen2.5-3B-Instruct), or TOKENIZER_PATH=fallback to train a" \
                "byte-level BPE on the data" ;;
        fallback) ;;  # argonne-ds trains one and keeps it beside the cache
        *) [ -d "$TOKENIZER_PATH" ] || die "TOKENIZER_PATH $TOKENIZER_PATH is not a folder"
           train+=(--tokenizer-path "$TOKENIZER_PATH") ;;
    esac
fi
add --cache-dir "${CACHE_DIR-${D:+.argonne_cache}}"
add --output-dir "${OUTPUT_DIR:-}"
add --block-size "${BLOCK_SIZE-${D:+4096}}"
add --batch-size "${BATCH_SIZE:-}"
add --gradient-accumulation-steps "${GRAD_ACCUM:-}"
add --learning-rate "${LR-${D:+3e-4}}"
add --min-learning-rate "${MIN_LR-${D:+3e-5}}"
add --warmup-steps "${WARMUP_STEPS-${D:+2000}}"
# --max-steps wins over --max-tokens in argonne-ds, so the default step budget applies only when
# no token budget is given.
if [ -n "${MAX_TOKENS:-}" ] || has_flag --max-tokens; then
    add --max-tokens "${MAX_TOKENS:-}"
    add --max-steps "${MAX_STEPS:-}"
else
    add --max-steps "${MAX_STEPS-${D:+100000}}"
fi
add --save-interval "${SAVE_INTERVAL-${D:+500}}"
add --checkpoint-keep "${CHECKPOINT_KEEP-${D:+3}}"
add --log-interval "${LOG_INTERVAL-${D:+10}}"
add --shuffle-window "${SHUFFLE_WINDOW:-}"
add --seed "${SEED:-}"
if [ ${#eval_globs[@]} -gt 0 ]; then
    train+=(--eval-data-glob "${eval_globs[@]}")
    add --eval-interval "${EVAL_INTERVAL-${D:+1000}}"
fi
add --sample-interval "${SAMPLE_INTERVAL:-}"
add --sample-prompt "${SAMPLE_PROMPT:-}"
# --bf16/--fp16/--fp32 exclude each other, so a precision flag passed through replaces this one.
if ! has_flag --bf16 --fp16 --fp32; then
    precision=${PRECISION-${D:+bf16}}
    case $precision in
        bf16 | fp16 | fp32) train+=("--$precision") ;;
        "") ;;
        *) die "PRECISION must be bf16, fp16, fp32 or empty, not '$PRECISION'" ;;
    esac
fi

# ---- .deepspeed_env: what the ssh-started nodes get -------------------------------------------
write_deepspeed_env() {
    local file=${DS_ENV_FILE:-.deepspeed_env} name prefix value names=() skipped=()
    for name in $(compgen -e); do
        case $name in *_API_KEY | *_TOKEN | *SECRET* | *PASSWORD*) continue ;; esac
        for prefix in $FORWARD_ENV; do
            [[ $name == "$prefix"* ]] || continue
            value=${!name}
            # DeepSpeed pastes the values into a remote shell command inside double quotes.
            case $value in
                *[$'\n'\"\$\`\\]*) skipped+=("$name") ;;
                *) names+=("$name") ;;
            esac
            break
        done
    done
    # Keep the file's other KEY=value lines; DeepSpeed's parser cannot skip comments or blanks.
    {
        if [ -f "$file" ]; then
            grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$file" \
                | grep -Ev "^($(IFS='|'; echo "${names[*]:-}"))=" || true
        fi
        for name in "${names[@]}"; do printf '%s=%s\n' "$name" "${!name}"; done
    } > "$file.tmp"
    mv "$file.tmp" "$file"
    say "wrote $file for the other nodes (DeepSpeed's ssh launch forwards only it and" \
        "PYTHON*/NCCL*/UCX*/MLFLOW*/MV2* variables): ${names[*]:-nothing to forward}"
    if [ ${#skipped[@]} -gt 0 ]; then
        say "not forwarded (quotes, \$, backslashes or newlines in the value): ${skipped[*]}"
    fi
}

# ---- the launcher flags -----------------------------------------------------------------------
launcher=(--master_port "${MASTER_PORT:-29500}")
HOSTFILE=${HOSTFILE-launch/hostfile}
if [ -z "$HOSTFILE" ]; then
    mode=local
    if [ -n "${NUM_GPUS:-}" ]; then launcher+=(--num_gpus "$NUM_GPUS"); fi
else
    [ -f "$HOSTFILE" ] || die "no hostfile at $HOSTFILE: copy launch/hostfile.example to" \
        "launch/hostfile and edit it, set HOSTFILE=path, or HOSTFILE= for this machine only"
    launcher+=(--hostfile "$HOSTFILE")
    if [ -n "${NODE_RANK:-}" ]; then
        mode=per-node
        first_host=$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")
        launcher+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:-$first_host}")
    else
        mode=ssh
        if [ -n "${MASTER_ADDR:-}" ]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
        # pdsh pastes the arguments into a remote shell command, quoting only those with
        # spaces: quote globs so they reach argonne-ds whole (it expands them in natural order)
        # instead of being expanded by the remote shell into one argument per shard.
        for i in "${!train[@]}"; do
            case ${train[i]} in *" "* | *"'"*) ;; *[*?[]*) train[i]="'${train[i]}'" ;; esac
        done
        for i in "${!passthrough[@]}"; do
            case ${passthrough[i]} in
                *" "* | *"'"*) ;; *[*?[]*) passthrough[i]="'${passthrough[i]}'" ;;
            esac
        done
    fi
fi
read -r -a extra_launcher <<< "${DS_LAUNCHER_ARGS:-}"
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART_DELAY=${RESTART_DELAY:-5}
case $MAX_RESTARTS$RESTART_DELAY in *[!0-9]*) die "MAX_RESTARTS and RESTART_DELAY must be" \
    "whole numbers, not '$MAX_RESTARTS' and '$RESTART_DELAY'" ;; esac

cmd=(deepspeed "${launcher[@]}" "${extra_launcher[@]}" --module argonne_ds.cli train
     "${train[@]}" "${passthrough[@]}")
say "$mode launch, OMP_NUM_THREADS=$OMP_NUM_THREADS, from $ROOT:"
say "$(printf '%q ' "${cmd[@]}")"

stops=0 child=""
# shellcheck disable=SC2317,SC2329 # called from the traps below
stop() {
    local launchers=() ranks=() p
    stops=$((stops + 1))
    mapfile -t launchers < <(pgrep -P "$child" || true)
    # On this node the ranks are the runner's grandchildren (runner -> launch -> ranks).
    if [ "$mode" != ssh ] && [ "$stops" -eq 1 ]; then
        for p in "${launchers[@]}"; do
            mapfile -t -O "${#ranks[@]}" ranks < <(pgrep -P "$p" || true)
        done
    fi
    if [ ${#ranks[@]} -gt 0 ]; then
        say "$1: asking the ranks (pids ${ranks[*]}) to save a checkpoint and exit; relaunch" \
            "to resume (a second signal stops at once)"
        kill -USR1 "${ranks[@]}" 2>/dev/null || true
    else
        # launch.py's own SIGTERM handler terminates its ranks.
        say "$1: stopping the launcher (a second signal, ranks not started yet, or remote ranks)"
        kill -TERM "$child" "${launchers[@]}" 2>/dev/null || true
    fi
}
trap 'stop SIGTERM' TERM
trap 'stop SIGUSR1' USR1

# ---- run, and relaunch after a crash, a hang or an out-of-memory error ------------------------
# Exit codes of argonne-ds train: 0 done or stopped after a save; 2 bad input, 3 out of memory at
# the smallest micro-batch, 4 too many bad steps in a row, 5 the output folder full, over quota or
# read-only (a relaunch would meet them again: not relaunched); 75 a hang (the watchdog) or an out-of-memory error (the next launch halves the
# micro-batch); 1 or a signal: a crash. Each relaunch resumes from the last checkpoint.
explain() {
    case $1 in
        1) echo "a crash, or a rank lost mid-collective: the first error above says which" ;;
        75) echo "a hung step or an out-of-memory error: see the [watchdog] or error lines above" ;;
        *) if [ "$1" -gt 128 ]; then echo "killed by signal $(($1 - 128))"
           else echo "an error"; fi ;;
    esac
}
restarts=0
while :; do
    export ARGONNE_RESTART=$restarts  # the ranks report it (and test hooks fire on launch 0)
    if [ "$mode" = ssh ]; then write_deepspeed_env; fi
    # The launchers (deepspeed runner -> deepspeed.launcher.launch) inherit "ignore SIGUSR1"
    # from this subshell: SIGUSR1's default action would kill them, and with them the job,
    # while the ranks (which install their own handler) are still writing the checkpoint.
    ( trap '' USR1; exec "${cmd[@]}" ) &
    child=$!
    # `wait` returns early when a trapped signal arrives: wait again until the launcher is gone.
    status=0
    while :; do
        wait "$child" && status=0 || status=$?
        kill -0 "$child" 2>/dev/null || break
    done
    case $status in 0 | 2 | 3 | 4 | 5) break ;; esac
    if [ "$stops" -gt 0 ]; then break; fi  # asked to stop: no relaunch
    if [ "$status" = 76 ]; then  # saved at the start of a phase with another context
        say "the next phase changes the context (block size, RoPE or global batch): launching" \
            "it now from the checkpoint just saved (not a restart)"
        continue
    fi
    if [ "$restarts" -ge "${MAX_RESTARTS}" ]; then
        say "the job exited $status ($(explain "$status")); MAX_RESTARTS=$MAX_RESTARTS" \
            "relaunches used up"
        break
    fi
    restarts=$((restarts + 1))
    say "the job exited $status ($(explain "$status")); relaunch $restarts of $MAX_RESTARTS" \
        "in ${RESTART_DELAY}s, resuming from the last checkpoint"
    sleep "$RESTART_DELAY" &
    wait $! || true
    if [ "$stops" -gt 0 ]; then break; fi
done
exit "$status"
