"""The one door to DeepSpeed: build an engine from a standard DeepSpeed JSON and drive it.

The JSON alone picks the mode:
    "pipeline": {"stages": N, ...}     -> the model as a PipelineModule, `train_batch` (1F1B)
    "zero_optimization": {"stage": 3}  -> the plain model built under `deepspeed.zero.Init`
    anything else                      -> the plain model, data parallel (ZeRO 0/1/2)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from argonne_ds.config import ArgonneConfig
from argonne_ds.engine import sequence
from argonne_ds.engine.collectives import Collectives, Sampling
from argonne_ds.engine.distributed import init_distributed
from argonne_ds.engine.ds_config import COMPILE_KEY, compile_options, engine_mode
from argonne_ds.engine.state import init_weights_by_name, load_plain_state, load_portable
from argonne_ds.model.loss import position_buckets
from argonne_ds.model.model import ArgonneBlock, ArgonneModel, RMSNorm, compile_blocks
from argonne_ds.model.pipe import build_pipeline_module, pipeline_batches
from argonne_ds.schedule import LRShape, WSDSchedule, start_scheduler

logger = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: none on norms and embeddings (the origin decayed both)."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, RMSNorm)):
            no_decay |= {id(p) for p in module.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    lr: float
    skipped: str | None = None  # why the update was skipped (weights unchanged)


class Engine(Collectives, Sampling):
    """Owns the DeepSpeed engine; the trainer never touches DeepSpeed directly."""

    def __init__(self, model_config: ArgonneConfig, ds_config: dict[str, Any],
                 weight_decay: float = 0.1, seed: int = 1234,
                 init_state: Mapping[str, torch.Tensor] | None = None,
                 init_weights: bool = True, lr_shape: LRShape | None = None) -> None:
        """`init_state`: plain-model weights to start from (e.g. an imported HF folder), loaded
        before deepspeed.initialize so the optimizer's fp32 masters are built from them.
        `init_weights=False` (a checkpoint will be resumed and overwrite every weight): the
        seed's by-name initialisation, tens of seconds per rank for argonne2, is skipped.
        `lr_shape`: a warmup-stable-decay schedule (schedule.py) instead of the JSON's."""
        self.weights_initialized = init_state is not None or init_weights
        init_distributed()
        self.model_config = model_config
        self.ds_config = copy.deepcopy(ds_config)
        self.mode = engine_mode(self.ds_config)
        torch.manual_seed(seed)
        # DeepSpeed's "activation_checkpointing" section, in any mode: every block's activations
        # are recomputed in backward instead of kept (a pipeline's own interval wins).
        recompute = "activation_checkpointing" in self.ds_config
        self.sp = sequence.sequence_parallel_size(self.ds_config)
        sequence.check(model_config, self.sp, dist.get_world_size(), self.mode == "pipeline")
        sp_group = sequence.init_groups(self.sp) if self.sp > 1 else None
        if self.mode == "pipeline":
            pipe = self.ds_config["pipeline"]
            model: nn.Module = build_pipeline_module(
                model_config, num_stages=int(pipe["stages"]),
                partition_method=pipe.get("partition_method", "compute"),
                activation_checkpoint_interval=int(pipe.get("activation_checkpoint_interval", 0))
                or int(recompute))
        elif self.mode == "zero3":
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                model = ArgonneModel(model_config)
        else:
            model = ArgonneModel(model_config)
        if recompute and isinstance(model, ArgonneModel):
            model.gradient_checkpointing = True
        if sp_group is not None:
            sequence.attach(model, self.sp, *sp_group)
        if init_state is not None:
            load_plain_state(self, model, init_state)
        elif init_weights:
            init_weights_by_name(self, model, seed)
        self.compile_options = compile_options(self.ds_config)
        self.compiled_blocks = 0
        if self.compile_options:
            if self.mode == "zero3":
                # ZeRO-3 then gathers a block's parameters in one hook on the block and puts
                # none on its children: nothing of ZeRO-3 runs inside the compiled forward.
                deepspeed.utils.set_z3_leaf_modules(model, [ArgonneBlock])
            self.compiled_blocks = compile_blocks(model, **self.compile_options)
        if lr_shape is not None:
            self.ds_config.pop("scheduler", None)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, weight_decay),
            config=sequence.deepspeed_config(
                {k: v for k, v in self.ds_config.items() if k != COMPILE_KEY}, self.sp),
            lr_scheduler=None if lr_shape is None else (
                lambda optimizer: WSDSchedule(optimizer, lr_shape)))
        self.module = model
        start_scheduler(self.scheduler)
        self._even_norm_collectives()
        self._fp32_norm: float | None = None
        self._verdict: str | None = None
        self._local_loss: float | None = None
        if not (self.engine.bfloat16_enabled() or self.engine.fp16_enabled()
                or self.engine.zero_optimization()):
            # Plain fp32 clips in clip_fp32_gradients but drops the norm it computed; keep it.
            from deepspeed.runtime.utils import clip_grad_norm_

            def clip_and_record() -> None:
                self._fp32_norm = float(clip_grad_norm_(
                    parameters=self.engine.module.parameters(),
                    max_norm=self.engine.gradient_clipping(), mpu=self.engine.mpu))

            self.engine.clip_fp32_gradients = clip_and_record

    def _even_norm_collectives(self) -> None:
        """ZeRO-1/2 computes the gradient norm once per parameter group, each time with an
        all_reduce over the pipeline's model-parallel group, and DeepSpeed drops empty groups:
        a stage that holds only the embedding (no decayed matrix) has one group where the others
        have two, and the stages wait on each other for ever in the first step. Stages with
        fewer groups add all_reduces of zero. The global norm (the square root of the sum of the
        squared group norms, over all groups and stages) is unchanged; only which stage's group
        is summed with which differs, and no single group's norm is used on its own."""
        opt = self.engine.optimizer
        if self.mode != "pipeline" or not hasattr(opt, "scaled_global_norm"):
            return
        groups = len(opt.bit16_groups)
        missing = max(self.gather(groups)) - groups
        if not missing:
            return
        inner = opt.scaled_global_norm

        def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
            norm = inner(norm_type)
            for _ in range(missing):
                opt._model_parallel_all_reduce(tensor=torch.zeros((), device=self.device),
                                               op=dist.ReduceOp.SUM)
            return norm

        opt.scaled_global_norm = scaled_global_norm

    # ---- facts the trainer needs ----------------------------------------------------------
    @property
    def global_rank(self) -> int:
        return dist.get_rank()

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel replica (a sequence-parallel group shares its samples)."""
        return dist.get_rank(group=self.engine.data_parallel_group) // self.sp

    @property
    def dp_world(self) -> int:
        return self.engine.dp_world_size // self.sp

    @property
    def micro_batch_size(self) -> int:
        return self.engine.train_micro_batch_size_per_gpu()

    @property
    def grad_accum(self) -> int:
        return self.engine.gradient_accumulation_steps()

    @property
    def global_batch_size(self) -> int:
        return self.engine.train_batch_size() // self.sp  # DeepSpeed counts each SP rank

    def layout(self) -> dict[str, Any]:
        """What a native DeepSpeed checkpoint is bound to: a checkpoint written under another
        layout is converted on resume (reshard.py)."""
        return {"mode": self.mode, "world_size": self.world_size,
                "pipeline_stages": int((self.ds_config.get("pipeline") or {}).get("stages", 0)),
                "zero_stage": int(self.engine.zero_optimization_stage()),
                # Which layers each stage holds (the ZeRO-1 optimizer files are per stage).
                "pipeline_parts": [int(b) for b in self.module.parts]
                if self.mode == "pipeline" else None}

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ---- training ----------------------------------------------------------------------------
    def guard_updates(self, verdict: Callable[[float, float | None], str | None]) -> None:
        """Ask `verdict(loss, grad_norm)` before every optimizer update whether to skip it.

        Called inside DeepSpeed's optimizer step, after the gradient norm is known and before
        the parameters move: the torch optimizer under DeepSpeed's wrapper (ZeRO, bf16) steps
        only when the verdict is None. Loss and norm are this step's global values (one
        all_reduce; in a pipeline only the last stage knows the loss), so every rank decides
        alike. A skipped update leaves fp32 masters, Adam moments and Adam's step count as they
        were; the wrapper copies the unchanged masters back to the working weights and clears
        the gradients as after any step."""
        opt = self.engine.optimizer
        base = getattr(opt, "optimizer", opt)
        inner = base.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if self._verdict is None:  # once per step (ZeRO steps once per parameter group)
                self._verdict = verdict(*self._global_loss_and_norm()) or ""
            return None if self._verdict else inner(*args, **kwargs)

        base.step = step

    def _global_loss_and_norm(self) -> tuple[float, float | None]:
        if self.mode == "pipeline":
            total = self.engine.total_loss if self.engine.is_last_stage() else None
            local = None if total is None else float(total) / self.engine.micro_batches
        else:
            local = self._local_loss
        opt = self.engine.optimizer
        norm = getattr(opt, "_global_grad_norm", None)
        norm = self._fp32_norm if norm is None else float(norm)
        t = torch.tensor([local or 0.0, float(local is not None), norm or 0.0,
                          float(norm is not None)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        loss_sum, count, norm_sum, norms = t.tolist()
        return loss_sum / max(count, 1.0), (norm_sum / norms if norms else None)

    def train_step(self, data: Iterator[Batch]) -> StepResult:
        """One optimizer step over one global batch (grad_accum micro-batches per rank)."""
        lr = self.lr()  # the LR this step uses (the scheduler moves on after the step)
        self.engine.train()
        self._verdict, self._local_loss, self._fp32_norm = None, None, None
        overflows = self.engine.skipped_steps
        if self.mode == "pipeline":
            loss = float(self.engine.train_batch(data_iter=pipeline_batches(data)))
        else:
            # Summed on the device (no host sync per micro-batch); only the loss is kept, so the
            # (B, T, V) logits are freed before backward.
            total = torch.zeros((), dtype=torch.float32, device=self.engine.device)
            for i in range(self.grad_accum):
                x, y = next(data)
                micro_loss = self.engine(x.to(self.engine.device),
                                         labels=y.to(self.engine.device)).loss
                self.engine.backward(micro_loss)
                total += micro_loss.detach().float()
                if i == self.grad_accum - 1:  # the update happens in this engine.step()
                    self._local_loss = float(total) / self.grad_accum
                self.engine.step()
            loss_t = total / self.grad_accum
            dist.all_reduce(loss_t, group=self.engine.data_parallel_group)
            loss = float(loss_t) / self.engine.dp_world_size  # SP ranks: shares x P
        norm = self.engine.get_global_grad_norm()
        norm = self._fp32_norm if norm is None else norm
        skipped = self._verdict or None
        if self.engine.skipped_steps != overflows:
            # DeepSpeed skipped the update itself (a non-finite gradient norm, an fp16
            # overflow) and held the LR schedule back: it follows the step count here.
            skipped = f"the gradient norm is not finite (loss {loss:.4g})"
            if self.scheduler is not None:
                self.scheduler.step()
        return StepResult(loss, None if norm is None else float(norm), lr, skipped)

    def set_step(self, step: int, samples: int | None = None) -> None:
        """Continue a run imported from elsewhere at `step`: counters and LR schedule."""
        self.engine.global_steps = step
        self.engine.global_samples = step * self.global_batch_size if samples is None else samples
        if self.scheduler is not None:
            self.scheduler.step(step)

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        """Mean loss over `batches` (this rank's share); the same number on every rank."""
        self.engine.eval()
        if self.mode == "pipeline":
            self.engine.reset_activation_shape()  # eval batches may differ after an OOM backoff
            it = pipeline_batches(batches)
            losses = [float(self.engine.eval_batch(it, num_micro_batches=1))
                      for _ in range(len(batches))]
            self.engine.reset_activation_shape()
            loss = torch.tensor(sum(losses) / max(1, len(losses)))
        else:
            total = torch.zeros(())
            for x, y in batches:
                out = self.engine(x.to(self.engine.device), labels=y.to(self.engine.device))
                total += out.loss.float().cpu()
            loss = total / max(1, len(batches))
        loss = loss.to(self.engine.device)
        dist.all_reduce(loss, group=self.engine.data_parallel_group)
        self.engine.train()
        return float(loss) / self.engine.dp_world_size

    @torch.no_grad()
    def eval_by_position(self, batches: list[Batch]) -> tuple[float, dict[str, float]]:
        """The held-out loss over `batches` (this rank's share; token-weighted) and per
        position bucket (model/loss.position_buckets), from one pass, the same on every rank.
        A pipeline's head returns each position's loss on the last stage."""
        if not batches:  # --eval-batches 0: nothing held out (eval_loss's 0.0, as before)
            return 0.0, {}
        self.engine.eval()
        T = batches[0][0].shape[1]
        sums = torch.zeros(2, T, dtype=torch.float64)
        head = self._stage_head() if self.mode == "pipeline" else None
        for x, y in batches:
            if self.mode == "pipeline":
                self.engine.reset_activation_shape()
                if head is not None:
                    head.per_token = True
                try:
                    out = self.engine.eval_batch(pipeline_batches([(x, y)]), return_logits=True,
                                                 num_micro_batches=1)
                finally:
                    if head is not None:
                        head.per_token = False
                self.engine.total_loss = None
                if not self.engine.is_last_stage():
                    continue  # the last stage adds its replica's positions
                losses = out[1].double().cpu()
            else:
                losses = self.engine(x.to(self.engine.device), labels=y.to(self.engine.device),
                                     per_token=True).loss.double().cpu()
            valid = (y != -100).double()
            sums[0] += (losses * valid).sum(0)
            sums[1] += valid.sum(0)
        if self.mode == "pipeline":
            self.engine.reset_activation_shape()
        sums = sums.to(self.device)
        dist.all_reduce(sums)  # a sequence-parallel group's ranks add the same: ratios hold
        self.engine.train()
        mean = float(sums[0].sum() / sums[1].sum().clamp(min=1))
        return mean, {f"{a}-{b - 1}": float(sums[0, a:b].sum() / sums[1, a:b].sum().clamp(min=1))
                      for a, b in position_buckets(T)}

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, directory: str | Path, tag: str, client_state: dict[str, Any],
             writer: Any = None) -> None:
        """`writer`: the CheckpointEngine for the files (checkpoint/writer.py: background)."""
        default, self.engine.checkpoint_engine = self.engine.checkpoint_engine, (
            writer or self.engine.checkpoint_engine)
        try:
            self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state,
                                        save_latest=False)
        finally:
            self.engine.checkpoint_engine = default

    def load_portable(self, bundle: Any, fallback_step: int) -> int:
        """Set this rank's weights and Adam moments from a layout-free bundle (state.py)."""
        return load_portable(self, bundle, fallback_step)

    def load(self, directory: str | Path, tag: str) -> dict[str, Any]:
        path, state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise FileNotFoundError(f"checkpoint {directory}/{tag} could not be loaded")
        if self.scheduler is not None:
            # The optimizer's state brought back the LR saved with it; this run's schedule (a
            # phase changed before it started, an appended decay) decides the next step's.
            self.scheduler.step(self.scheduler.last_batch_iteration)
        return state or {}
