"""Which context a launch trains with, when phases change it (a context extension: phases.py).

One launch runs one context: one block size, one global batch, one RoPE, so one model config,
one DeepSpeed batch shape and one data layout. The launch takes the context of the phase its
first step belongs to (from the checkpoint it will resume), trains until the last step before a
phase with another context, saves there and exits `Exit.NEXT_PHASE`; launch/train.sh launches
again at once and the next launch builds the next context from that checkpoint. No weight
depends on the context, so the checkpoint loads as it is; its data position carries over by
tokens (data/layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from argonne_ds.config import ArgonneConfig, with_context
from argonne_ds.engine.ds_config import resolve_ds_config
from argonne_ds.phases import Context, Plan
from argonne_ds.run_config import RunConfig


@dataclass(frozen=True)
class Launch:
    """This launch's context. `contexts`: every phase's (None: the run's context never changes);
    `end_step`: the last step this launch trains before a phase with another context starts."""

    block_size: int
    contexts: list[Context] | None = None
    plan: Plan | None = None
    phase: int = 0
    end_step: int | None = None
    base_model: ArgonneConfig | None = None  # the model config before any phase changed it
    trained: int = 0  # the context the first phase trains at (yarn/llama3's original)

    def context_at(self, step: int) -> Context | None:
        """The context optimizer step `step` (1-based) trains with (None: no phases change it)."""
        if self.contexts is None or self.plan is None:
            return None
        return self.contexts[self.plan.phase_at(max(step, 1))]

    def samples_at(self, step: int, global_batch: int) -> int:
        """Global samples drawn by the end of optimizer step `step`."""
        if self.contexts is None or self.plan is None:
            return step * global_batch
        p = self.plan.phase_at(max(step, 1))
        c = self.contexts[p]
        return c.start_sample + (step - self.plan.phases[p].start) * c.global_batch

    def model_at(self, step: int) -> dict[str, Any] | None:
        """The context part of the model that trained step `step` (None: no phase changes it)."""
        c = self.context_at(step)
        if c is None or self.base_model is None:
            return None
        return model_context(with_context(self.base_model, c.block_size, c.rope_parameters,
                                          self.trained))

    def check_resumed(self, step: int) -> None:
        """The resumed checkpoint (an older one, when the newest would not load) may belong to
        another context than the one this launch was built for: relaunch, which builds it."""
        c = self.context_at(step + 1)
        if c is not None and c.key != self.context_at(self.first_step).key:
            from argonne_ds.reliability import Exit, JobError

            raise JobError(f"resumed step {step}, which trains with another context than this "
                           "launch was built for; relaunching builds it", Exit.NEXT_PHASE,
                           everywhere=True)

    @property
    def first_step(self) -> int:
        assert self.plan is not None
        return max(self.plan.phases[self.phase].start + 1, 1)

    def describe(self) -> str:
        assert self.plan is not None and self.contexts is not None
        p, c = self.plan.phases[self.phase], self.contexts[self.phase]
        rope = dict(c.rope_parameters or {"rope_type": "the model's"})
        kind = rope.pop("rope_type")
        args = f" ({', '.join(f'{k} {v}' for k, v in sorted(rope.items()))})" if rope else ""
        until = f" until step {self.end_step}" if self.end_step is not None else ""
        return (f"phase {p.name!r} context{until}: blocks of {c.block_size:,} tokens, global "
                f"batch {c.global_batch} ({c.block_size * c.global_batch:,} tokens a step), "
                f"RoPE {kind}{args}")


def plan_launch(run: RunConfig, plan: Plan | None, model: ArgonneConfig, world: int,
                micro_cap: int | None, resume_step: int | None
                ) -> tuple[Launch, ArgonneConfig, dict[str, Any], int, list[str]]:
    """(the launch, its model config, its DeepSpeed config, max_steps, notes)."""
    ds_config, max_steps, notes = resolve_ds_config(run, world, micro_cap=micro_cap)
    if plan is None or not plan.changes_context:
        return Launch(run.data.block_size), model, ds_config, max_steps, notes
    contexts = plan.contexts(run.data.block_size, int(ds_config["train_batch_size"]))
    first = (resume_step or 0) + 1
    phase = plan.phase_at(first)
    ctx = contexts[phase]
    later = [i for i in range(phase + 1, len(contexts)) if contexts[i].key != ctx.key]
    end = plan.phases[later[0]].start if later else None
    launch = Launch(ctx.block_size, contexts, plan, phase, end, model, run.data.block_size)
    if ctx.global_batch != contexts[0].global_batch:
        ds_config, _, notes = resolve_ds_config(run, world, micro_cap=micro_cap,
                                                phase_batch=ctx.global_batch)
    notes.append(launch.describe())
    return launch, with_context(model, ctx.block_size, ctx.rope_parameters,
                                run.data.block_size), ds_config, max_steps, notes


def model_context(config: ArgonneConfig | dict[str, Any]) -> dict[str, Any]:
    """What of a model config a context phase changes (compared on resume)."""
    d = config if isinstance(config, dict) else config.to_dict()
    return {k: d.get(k) for k in ("max_position_embeddings", "rope_parameters")}
