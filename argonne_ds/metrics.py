"""Seeing the job: FLOPs/MFU, and the metrics sinks (console line, JSONL file, wandb).

wandb is initialised here rather than through DeepSpeed's monitor because a resumed job must
continue the same run: the run id lives in the checkpoint and goes to `wandb.init(id=...)`,
which DeepSpeed's WandbMonitor does not pass.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.model import count_parameters

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s from the datasheets (the MFU denominator).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
               "MI300X": 1307.0, "GH200": 989.0, "B200": 2250.0}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def flops_per_token(config: ArgonneConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM-style: 6 x matmul parameters (the head included, the
    embedding lookup not) + 12 x layers x attention width x sequence length."""
    counts = count_parameters(config)
    matmul = counts["total"] - config.vocab_size * config.hidden_size
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul + attn


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsSink:
    """Rank 0 only: every record goes to output_dir/metrics.jsonl (always) and to wandb (unless
    WANDB_MODE=disabled; offline by default)."""

    def __init__(self, output_dir: str | Path, run_id: str | None, config: dict[str, Any],
                 project: str = "argonne-ds", enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        os.environ.setdefault("WANDB_MODE", "offline")
        if os.environ["WANDB_MODE"] != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project),
                                        id=self.run_id, resume="allow", config=config,
                                        dir=os.environ.get("WANDB_DIR", str(output_dir)),
                                        settings=wandb.Settings(quiet=True))
            except Exception as e:  # noqa: BLE001 - metrics must never kill training
                logger.warning("wandb unavailable (%s); metrics go to %s only", e, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            step = record.get("step")
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)
                            and k != "step"}, step=step)

    def text(self, step: int, key: str, text: str) -> None:
        self.log({"step": step, "event": key, key: text})
        if self.wandb is not None:
            self.wandb.log({key: text}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
