"""The PipelineModule form: key conversion is exact, and on 2 gloo ranks (2 stages) the pipeline
engine's loss equals the plain model's, step after step."""

from __future__ import annotations

import pytest
import torch

from argonne_ds.config import ArgonneConfig
from argonne_ds.model import ArgonneModel
from argonne_ds.model.partition import compute_partition, layer_flops
from argonne_ds.model.pipe import (
    layer_specs,
    parameters_partition,
    pipe_to_plain_key,
    pipe_to_plain_state,
    plain_to_pipe_key,
    plain_to_pipe_state,
)
from argonne_ds.testing import run_distributed_test

CONFIG = dict(vocab_size=101, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=96,
              max_position_embeddings=32)
ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MICRO, GAS, SEQ, STEPS = 2, 2, 16, 5


def test_key_conversion_round_trips_exactly() -> None:
    model = ArgonneModel(ArgonneConfig(**CONFIG))
    state = model.state_dict()
    pipe = plain_to_pipe_state(state, 4)
    assert {"0.weight", "1.attn.q_proj.weight", "4.mlp.down_proj.weight"} <= set(pipe)
    assert "5.weight" in pipe and "6.weight" in pipe  # final norm, head
    back = pipe_to_plain_state(pipe, 4)
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)
    for bad in ("7.weight", "x.weight", "3"):
        with pytest.raises(KeyError):
            pipe_to_plain_key(bad, 4)
    with pytest.raises(KeyError):
        plain_to_pipe_key("rotary.inv_freq", 4)


def test_layer_specs_are_embedding_blocks_norm_head() -> None:
    specs = layer_specs(ArgonneConfig(**CONFIG))
    names = [s.typename.__name__ for s in specs]
    assert names == ["EmbeddingPipe"] + ["BlockPipe"] * 4 + ["NormPipe", "HeadPipe"]


def test_tied_embeddings_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        layer_specs(ArgonneConfig(**{**CONFIG, "tie_word_embeddings": True}))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        block = torch.randint(0, CONFIG["vocab_size"], (MICRO, SEQ + 1), generator=g)
        out.append((block[:, :-1].contiguous(), block[:, 1:].contiguous()))
    return out


def pipeline_engine(config: ArgonneConfig, plain: ArgonneModel, partition: str,
                    ckpt_interval: int) -> tuple:
    """(module, engine): a 2-stage DeepSpeed pipeline (ZeRO-0, torch AdamW, micro-batch MICRO x
    GAS) holding `plain`'s weights."""
    import deepspeed

    from argonne_ds.model.pipe import build_pipeline_module, load_plain_state_into_pipe

    pipe = build_pipeline_module(config, num_stages=2, partition_method=partition,
                                 activation_checkpoint_interval=ckpt_interval)
    load_plain_state_into_pipe(pipe, plain.state_dict(), config.num_hidden_layers)
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "optimizer": {"type": "AdamW", "params": {**ADAMW, "torch_adam": True}},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0},
    }
    engine, *_ = deepspeed.initialize(model=pipe, config=ds_config,
                                      model_parameters=[p for p in pipe.parameters()])
    return pipe, engine


def _pipeline_vs_plain(rank: int, world: int, partition: str, ckpt_interval: int,
                       vocab: int) -> dict:
    import torch.distributed as dist

    from argonne_ds.model.pipe import pipeline_batches

    config = ArgonneConfig(**{**CONFIG, "vocab_size": vocab})
    torch.manual_seed(0)
    plain = ArgonneModel(config)
    pipe, engine = pipeline_engine(config, plain, partition, ckpt_interval)
    # Every rank holds a full plain model and trains it the same way, micro-batch by micro-batch.
    opt = torch.optim.AdamW(plain.parameters(), **ADAMW)
    batches = _batches(STEPS * GAS)
    pipe_losses, plain_losses = [], []
    for step in range(STEPS):
        micro = batches[step * GAS:(step + 1) * GAS]
        pipe_losses.append(engine.train_batch(data_iter=pipeline_batches(micro)).item())
        opt.zero_grad()
        total = 0.0
        for x, y in micro:
            loss = plain(x, labels=y).loss / GAS
            loss.backward()
            total += loss.item()
        opt.step()
        plain_losses.append(total)
    # Each stage's weights, renamed to plain names, against the plain model's after 5 steps.
    plain_state = plain.state_dict()
    own = pipe_to_plain_state(pipe.state_dict(), config.num_hidden_layers)
    weight_diff = max((own[k] - plain_state[k]).abs().max().item() for k in own)
    keys: list = [None] * world
    dist.all_gather_object(keys, sorted(own))
    return {"pipe": pipe_losses, "plain": plain_losses, "weight_diff": weight_diff,
            "stage_keys": keys, "parts": [int(b) for b in pipe.parts]}


@pytest.mark.distributed
@pytest.mark.parametrize("partition,ckpt_interval,vocab",
                         [("compute", 0, 1000), ("parameters", 0, 101), ("type:BlockPipe", 1, 101)])
def test_pipeline_engine_matches_plain_model(partition: str, ckpt_interval: int,
                                             vocab: int) -> None:
    results = run_distributed_test(_pipeline_vs_plain, world_size=2,
                                   args=(partition, ckpt_interval, vocab), timeout_s=180)
    first = results[0]
    # train_batch broadcasts the last stage's loss to every stage.
    assert results[1]["pipe"] == first["pipe"]
    for step, (a, b) in enumerate(zip(first["pipe"], first["plain"])):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), f"step {step}: pipeline {a} vs plain {b}"
    assert first["plain"][-1] < first["plain"][0]  # it trained (the comparison is not vacuous)
    for r in results:
        assert r["weight_diff"] < 3e-5  # 5 Adam steps of float rounding (1.03e-5 at vocab 1000)
    # The two stages together hold every parameter exactly once.
    stage0, stage1 = first["stage_keys"]
    assert not set(stage0) & set(stage1)
    config = ArgonneConfig(**{**CONFIG, "vocab_size": vocab})
    assert set(stage0) | set(stage1) == set(ArgonneModel(config).state_dict())
    if partition == "compute":  # the bounds computed from the config, not DeepSpeed's
        flops = layer_flops(config, config.max_position_embeddings)
        assert first["parts"] == compute_partition(flops, 2) != parameters_partition(config, 2)
