"""Resuming and saving a training run, around store.py's bookkeeping.

`Checkpointer.resume()` picks the checkpoint (the newest complete one, or `--checkpoint-path`),
checks that it belongs to this run (model, run config), then either loads it natively or, when it
was written under another layout (pipeline <-> ZeRO-3, other rank counts), converts it
(reshard.py); both restore weights, optimizer, LR schedule, counters and the data position.
`carry_import()` continues a run imported from the original code at its step and data position.
Saving (`save()`, in the background or not, the disk-space checks) is saver.py's `Saving`, which
the Checkpointer extends. Every collective goes through an Engine method, in the same order on
every rank.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argonne_ds.checkpoint import store as ckpt
from argonne_ds.checkpoint.saver import Saving
from argonne_ds.config import ArgonneConfig
from argonne_ds.data.stream import ResumableShardIterator
from argonne_ds.data.tokenizer import LoadedTokenizer
from argonne_ds.engine.engine import Engine
from argonne_ds.extension import Launch, model_context
from argonne_ds.metrics import format_duration, say
from argonne_ds.model.pipe import parameters_partition
from argonne_ds.run_config import ConfigError, RunConfig, compare
from argonne_ds.safe_load import verify_folder

logger = logging.getLogger(__name__)
# What makes two models the same for a resume (the rest of the config may change).
ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings")


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    run_id: str | None = None
    guard: dict[str, Any] | None = None  # the bad-step guard's window and counts


def with_stage_bounds(info: dict[str, Any], config: ArgonneConfig) -> dict[str, Any]:
    """A checkpoint marker with its pipeline's stage bounds: a marker written before they were
    recorded gets DeepSpeed's "parameters" partition, which every pipeline then used (the
    shipped JSONs and the default)."""
    if info.get("mode") == "pipeline" and info.get("pipeline_parts") is None:
        info = {**info, "pipeline_parts": parameters_partition(
            config, int(info["pipeline_stages"]))}
    return info


def _state(client: dict[str, Any]) -> TrainState:
    return TrainState(client["step"], client["tokens"], client.get("wandb_run_id"),
                      client.get("guard"))


class Checkpointer(Saving):
    def __init__(self, run: RunConfig, engine: Engine, data: ResumableShardIterator,
                 tok: LoadedTokenizer, resolved: dict[str, Any], launch: Launch | None = None
                 ) -> None:
        self.run, self.engine, self.data, self.tok = run, engine, data, tok
        self.launch = launch or Launch(run.data.block_size)
        self.resolved = resolved
        self.directory = Path(run.checkpoint.output_dir) / ckpt.CHECKPOINTS
        self.rank0 = engine.global_rank == 0
        self.branch: dict[str, Any] | None = None  # {"trunk": checkpoint, "step"} of a branch

    def _where(self) -> tuple[Path, str | None]:
        """The checkpoints to resume: this run's own, or --checkpoint-path's. A branch (its
        --checkpoint-path in another run) resumes its own newest checkpoint once it has one, so
        that a relaunch continues the branch instead of restarting it from the trunk."""
        given = self.run.checkpoint.checkpoint_path
        if not given:
            return self.directory, None
        directory, tag = ckpt.split_checkpoint_path(given)
        if Path(directory).resolve() == self.directory.resolve():
            return directory, tag
        own = self.engine.broadcast_object(ckpt.resume_candidates(self.directory)
                                           if self.rank0 else None)
        if own:
            branch = ckpt.read_marker(self.directory / own[0]).get("branch") or {}
            if Path(branch.get("trunk", "/nonexistent")).parent == Path(directory).resolve():
                say(self.rank0, f"[train] this branch of {branch['trunk']} has checkpoints of "
                    f"its own: resuming {self.directory}/{own[0]}, not the trunk")
                return self.directory, None
            raise ConfigError(f"--output-dir {self.run.checkpoint.output_dir} already holds "
                              f"checkpoints of another run ({own[0]}); branch into a new "
                              "--output-dir, or drop --checkpoint-path to resume them")
        return directory, tag

    # ---- resume -------------------------------------------------------------------------------
    def resume(self) -> TrainState:
        given = self.run.checkpoint.checkpoint_path
        directory, tag = self._where()
        # Rank 0 chooses, so every rank tries the same checkpoints in the same order.
        candidates = self.engine.broadcast_object(
            [tag] if tag else (ckpt.resume_candidates(directory) if self.rank0 else None))
        if given and not candidates:
            raise ConfigError(f"--checkpoint-path {given}: no complete checkpoint there")
        foreign = Path(directory).resolve() != self.directory.resolve()
        for tag in candidates:
            if foreign:  # another run's files: DeepSpeed unpickles them fully (safe_load.py)
                verify_folder(directory / tag)
            info = with_stage_bounds(self._check_compatible(directory / tag),
                                     self.engine.model_config)
            # Keys an older marker lacks (None) are not counted as changes.
            if any(info.get(k) not in (None, v) for k, v in self.engine.layout().items()):
                state = self._resume_resharded(directory / tag, info)
                self._abandon_later(directory, tag)
                return state
            try:
                client, ok = self.engine.load(directory, tag), True
            except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: fall back
                logger.warning("could not load checkpoint %s/%s (%s: %s); trying an earlier one",
                               directory, tag, type(e).__name__, e)
                client, ok = {}, False
            if not self.engine.all_ranks(ok):  # all ranks resume from the same one
                continue
            self._restore_data(client)
            self._abandon_later(directory, tag)  # only once the resume can no longer fail
            self._note_branch(directory, tag, client)
            say(self.rank0, f"[train] resumed from {directory}/{tag}: step {client['step']}, "
                f"{client['tokens']:,} tokens, data sample {self.data.samples:,}")
            return _state(client)
        if candidates and not self.engine.weights_initialized:
            # The seed's initial weights were skipped for this resume: do not train from them.
            raise ConfigError(f"no checkpoint in {directory} could be loaded "
                              f"({', '.join(candidates)}; warnings above): move them aside to "
                              "start this run afresh, or pass --checkpoint-path to one that loads")
        return TrainState()

    def _note_branch(self, directory: Path, tag: str, client: dict[str, Any]) -> None:
        """Resumed from another run's checkpoint: this run is a branch of it (an anneal), which
        its checkpoints, metrics and wandb config record; the trunk is only read."""
        if Path(directory).resolve() == self.directory.resolve():
            self.branch = client.get("branch")
        else:
            self.branch = {"trunk": str((Path(directory) / tag).resolve()),
                           "step": int(client["step"])}
            say(self.rank0, f"[train] a branch of {self.branch['trunk']} at step "
                f"{client['step']}: the trunk is only read; this run saves to {self.directory}")
        if self.branch:
            self.resolved["branch"] = self.branch

    def _abandon_later(self, directory: Path, tag: str) -> None:
        """Resuming this run from an earlier checkpoint (a rollback, or a newer one that would
        not load): its later checkpoints belong to a branch that is over, and must not win the
        next automatic resume nor be rotated in place of the new branch's."""
        if Path(directory).resolve() != self.directory.resolve():
            return
        later = [t for t in ckpt.list_tags(directory)[0] if ckpt.step_of(t) > ckpt.step_of(tag)]
        if later and self.rank0:
            aside = ckpt.set_aside(directory, later)
            logger.warning("resuming from %s: the later checkpoints %s of this run are set "
                           "aside in %s", tag, ", ".join(later), aside)
        self.engine.barrier()

    def _check_compatible(self, path: Path) -> dict[str, Any]:
        info = ckpt.read_marker(path)
        model = self.engine.model_config.to_dict()
        saved = {k: v for k, v in info.get("model", {}).items() if k in ARCH_KEYS}
        now = {k: v for k, v in model.items() if k in ARCH_KEYS}
        if saved != now:
            diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
            raise ConfigError(f"checkpoint {path} holds a different model ({diff}, saved vs "
                              "now); pass the --model it was trained with, or a new --output-dir")
        self._check_context(path, info.get("model", {}))
        changes = compare(info.get("run") or {}, self.run)
        refused = [c for c in changes if c.kind == "refuse"]
        if refused:
            raise ConfigError(
                f"checkpoint {path} was trained with {', '.join(str(c) for c in refused)} (before "
                "-> now): its data position would point at other data; resume with the values "
                "it started with, or start a new run in another --output-dir")
        for c in changes if self.rank0 else ():
            if c.kind == "warn":
                logger.warning("run config changed since %s: %s; the run continues differently "
                               "from here", path.name, c)
            else:
                logger.info("run config changed since %s: %s (no effect on the training)",
                            path.name, c)
        return info

    def _check_context(self, path: Path, saved: dict[str, Any]) -> None:
        """The context (context length, RoPE) changes only where a phase changes it."""
        step = ckpt.step_of(path.name) or 0
        expected = self.launch.model_at(step) or model_context(self.engine.model_config)
        diff = {k: (saved[k], v) for k, v in expected.items() if k in saved and saved[k] != v}
        if diff:
            raise ConfigError(
                f"checkpoint {path} was trained with another context than this run gives step "
                f"{step} ({diff}, saved vs now): a started phase cannot change, and the context "
                "changes only with a new phase (block_size, rope_parameters: "
                "docs/long_context.md), not in the model config; or start a new --output-dir")

    def _check_global_batch(self, client: dict[str, Any]) -> None:
        saved, now = client["data"].get("global_batch_size"), self.engine.global_batch_size
        phase = self.launch.context_at(int(client["step"]))
        if phase is not None and client["step"]:  # phases set the global batch
            if saved not in (None, phase.global_batch):
                raise ConfigError(f"the checkpoint was trained with a global batch of {saved} "
                                  f"samples, its phase makes {phase.global_batch}: a started "
                                  "phase cannot change; restore it, or pass the "
                                  "--global-batch-size the run started with")
            return
        if saved not in (None, now) and len(self.run.train.phases) > 1:
            raise ConfigError(f"the checkpoint was trained with a global batch of {saved} "
                              f"samples, this job makes {now}: a run in phases keeps its global "
                              f"batch (phases start at steps); pass --global-batch-size {saved}")
        if saved not in (None, now):
            if not self.run.train.allow_global_batch_change:
                raise ConfigError(
                    f"the checkpoint was trained with a global batch of {saved} samples, this job "
                    f"makes {now} (micro-batch {self.engine.micro_batch_size} x accumulation "
                    f"{self.engine.grad_accum} x {self.engine.dp_world} data-parallel ranks): pass "
                    f"--global-batch-size {saved} to keep it (accumulation follows the layout), "
                    "or --allow-global-batch-change to go on with the new one")
            if self.rank0:
                logger.warning("the global batch changes from %s to %d samples "
                               "(--allow-global-batch-change); the data continues at sample %d, "
                               "the LR schedule at step %d", saved, now,
                               client["data"]["samples"], client["step"])

    def _restore_data(self, client: dict[str, Any]) -> None:
        self._check_global_batch(client)
        self.data.set_batch_size(self.engine.global_batch_size, self.engine.micro_batch_size)
        self.data.load_state_dict(client["data"],
                                  allow_shard_change=self.run.data.allow_shard_change)

    def _resume_resharded(self, path: Path, info: dict[str, Any]) -> TrainState:
        """Written under another layout: carry weights, Adam moments, step, LR schedule and
        data position (reshard.py)."""
        from argonne_ds.checkpoint import reshard

        now = self.engine.layout()
        was = ", ".join(f"{k} {info.get(k)}" for k in now if info.get(k) is not None)
        say(self.rank0, f"[train] {path} was written with {was}; this job has "
            f"{', '.join(f'{k} {v}' for k, v in now.items() if v is not None)}: converting it")
        source = reshard.read_source(path, info)
        self._check_global_batch(source.client)  # before the conversion's minutes
        t0 = time.perf_counter()
        error = reshard.convert_once(source, self.rank0)
        if error:  # every rank alike
            raise ConfigError(error)
        client = source.client
        bundle = reshard.Bundle(path / reshard.UNIVERSAL, source.mode,
                                self.engine.model_config.num_hidden_layers)
        adam_step = self.engine.load_portable(bundle, fallback_step=int(client["global_steps"]))
        took = format_duration(time.perf_counter() - t0)
        self.engine.set_step(int(client["step"]), samples=client.get("global_samples"))
        self._restore_data(client)
        self._note_branch(path.parent, path.name, client)
        say(self.rank0, f"[train] resumed from {path} across layouts: step {client['step']}, "
            f"{client['tokens']:,} tokens, data sample {self.data.samples:,}; weights, Adam "
            f"moments (step {adam_step}) and LR schedule carried (converted and loaded in {took})")
        return _state(client)

    # ---- an imported original run ---------------------------------------------------------
    def carry_import(self, state: TrainState) -> TrainState:
        """Weights came from an HF folder; an imported original checkpoint also carries its step
        and tokens, so the LR schedule continues where it stopped, and its data position where
        this shard list is the one it read."""
        folder = self.run.train.from_hf
        meta_path = Path(folder) / "argonne_import.json"
        say(self.rank0, f"[train] starting from the weights of {folder}")
        if not meta_path.is_file():
            return state
        meta = json.loads(meta_path.read_text())
        step = int(meta.get("step") or 0)
        self.engine.set_step(step)
        say(self.rank0, f"[train] imported from {meta.get('source')}: step {step}, "
            f"{meta.get('tokens', 0):,} tokens; LR schedule continues at step {step}; optimizer "
            "moments restart (the original's are keyed by parameter index, not name)")
        samples, how = self._translate_import_position(meta.get("data_position"))
        if samples is None:
            if self.rank0:
                logger.warning("data position of the original NOT carried: %s; training starts "
                               "at the first block of the data", how)
        else:
            self.data.seek(samples)
            say(self.rank0, f"[train] data position of the original translated: {how}")
        return TrainState(step, int(meta.get("tokens") or 0), state.run_id)

    def _translate_import_position(self, pos: Any) -> tuple[int | None, str]:
        from argonne_ds.convert.original import translate_position
        from argonne_ds.data.discovery import discover_shards
        from argonne_ds.data.tokenizer import make_encoder

        data = self.run.data
        if data.sources:
            return None, "a run with data.sources has no single stream to place it in"
        if self.data.mode != "cache":
            return None, "streaming mode (no --cache-dir) cannot seek to it"
        if data.shuffle_window > 1:
            return None, "--shuffle-window reorders the blocks, so no sample index matches it"
        return translate_position(pos, self.data.cache_index.entries,
                                  discover_shards(data.data_glob), data.text_column,
                                  make_encoder(self.tok, data.encoder), data.block_size,
                                  self.data.blocks_per_epoch)
