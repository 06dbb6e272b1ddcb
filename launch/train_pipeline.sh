#!/usr/bin/env bash
# Pretrain with pipeline parallelism: ds_configs/pipeline.json (4 stages, ZeRO-1, bf16; the
# world size must be a multiple of 4). Everything else is launch/train.sh's: its header lists
# the variables (HOSTFILE, NODE_RANK, TOKENIZER_PATH, DATA_GLOB, MAX_STEPS, ...), and flags
# given here pass through to `argonne-ds train`, e.g.
#   TOKENIZER_PATH=/models/Qwen2.5-3B-Instruct bash launch/train_pipeline.sh --max-steps 20000
# Checkpoints go to runs/argonne2-pipeline unless OUTPUT_DIR says otherwise; relaunching with
# another JSON or GPU count converts them (docs/training.md "Swapping the JSON mid-run"), the global batch
# (the JSON's train_batch_size) kept.
exec bash "$(dirname "${BASH_SOURCE[0]}")/train.sh" ds_configs/pipeline.json "$@"
