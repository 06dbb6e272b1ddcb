#!/usr/bin/env bash
# Pretrain with ZeRO-3: ds_configs/zero3.json (parameters, gradients and optimizer state
# sharded over every GPU, bf16; any GPU count). Everything else is launch/train.sh's: its
# header lists the variables (HOSTFILE, NODE_RANK, TOKENIZER_PATH, DATA_GLOB, MAX_STEPS, ...),
# and flags given here pass through to `argonne-ds train`, e.g.
#   TOKENIZER_PATH=/models/Qwen2.5-3B-Instruct bash launch/train_zero3.sh --max-steps 20000
# Checkpoints go to runs/argonne2-zero3 unless OUTPUT_DIR says otherwise.
exec bash "$(dirname "${BASH_SOURCE[0]}")/train.sh" ds_configs/zero3.json "$@"
