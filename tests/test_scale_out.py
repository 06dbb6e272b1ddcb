"""The same training at the shapes users run: 4 gloo ranks as pipelines of 2 and 4 stages (ZeRO-0
and ZeRO-1, with a stage that holds only the embedding and one that holds only the head), 2
stages x 2 replicas, ZeRO-3 and data parallel on 4 — against the 2-rank 2-stage pipeline. Same
seed, same data, same global batch: the same initial weights (bitwise) and the same losses."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.model import ArgonneModel, init_by_name
from argonne_ds.testing import free_port, run_distributed_test
from tests.train_helpers import (
    env,
    read_metrics,
    run,
    run_until_step_then,
    steps,
    train_cmd,
    with_launcher,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# 8 blocks; an embedding and a head as large as ~4 blocks each, so DeepSpeed's "parameters"
# partition gives 4 stages an embedding-only first stage and a head-only last one.
CONFIG = dict(vocab_size=1024, hidden_size=32, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, intermediate_size=64,
              max_position_embeddings=16)
SEED, GLOBAL, MICRO, SEQ, STEPS = 7, 16, 2, 16, 6


def ds_config(world: int, stages: int, zero: int) -> dict:
    replicas = world // max(1, stages)
    cfg = {"train_micro_batch_size_per_gpu": MICRO,
           "gradient_accumulation_steps": GLOBAL // (MICRO * replicas),
           "gradient_clipping": 1.0, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95],
                                                     "eps": 1e-8, "torch_adam": True}},
           "zero_optimization": {"stage": zero}}
    if stages:
        cfg["pipeline"] = {"stages": stages, "partition_method": "parameters"}
    return cfg


def _sample(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, CONFIG["vocab_size"], (SEQ + 1,), generator=g)


def _rank_batches(dp_rank: int, dp_world: int, steps: int):
    """This data-parallel rank's micro-batches: its slice of every global batch, in order."""
    per_rank = GLOBAL // dp_world
    for step in range(steps):
        first = step * GLOBAL + dp_rank * per_rank
        for m in range(0, per_rank, MICRO):
            block = torch.stack([_sample(first + m + k) for k in range(MICRO)])
            yield block[:, :-1].contiguous(), block[:, 1:].contiguous()


def _train(rank: int, world: int, stages: int, zero: int, extra: dict | None = None) -> dict:
    import deepspeed

    from argonne_ds.engine.engine import Engine
    from argonne_ds.engine.state import plain_name

    engine = Engine(ArgonneConfig(**CONFIG), ds_config(world, stages, zero) | (extra or {}),
                    seed=SEED)
    held: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            held[plain_name(engine, name)] = p.detach().float().clone()
    data = _rank_batches(engine.dp_rank, engine.dp_world, STEPS)
    losses = [engine.train_step(data).loss for _ in range(STEPS)]
    recomputed = (engine.engine.module.activation_checkpoint_interval if stages
                  else engine.module.gradient_checkpointing)
    return {"held": held, "losses": losses, "dp": engine.dp_world, "recomputed": recomputed,
            "compiled": engine.compiled_blocks}


def _reference_init() -> dict[str, torch.Tensor]:
    model = ArgonneModel(ArgonneConfig(**CONFIG))
    init_by_name(model, model.config, SEED)
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pipeline_2() -> dict:
    return run_distributed_test(_train, world_size=2, args=(2, 1), timeout_s=240)[0]


LAYOUTS = {  # name: (world, pipeline stages or 0, ZeRO stage)
    "pipeline4_zero1": (4, 4, 1), "pipeline4_zero0": (4, 4, 0), "pipeline2x2": (4, 2, 1),
    "zero3_on_4": (4, 0, 3), "data_parallel_on_4": (4, 0, 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_model_and_losses_on_4_ranks(pipeline_2: dict, layout: str) -> None:
    world, stages, zero = LAYOUTS[layout]
    results = run_distributed_test(_train, world_size=world, args=(stages, zero), timeout_s=240)
    reference = _reference_init()
    held = {}
    for r in results:
        held.update(r["held"])
    assert set(held) == set(reference)
    for name, value in reference.items():  # bitwise: the seed and the name decide
        assert torch.equal(held[name], value), name
    if layout == "pipeline4_zero1":
        shares = [sorted(r["held"]) for r in results]
        assert shares[0] == ["embed_tokens.weight"]  # the embedding alone
        assert shares[-1] == ["lm_head.weight", "norm.weight"], shares  # the head, no block
    for r in results:
        assert r["losses"] == pytest.approx(pipeline_2["losses"], abs=1e-5), (r["losses"],
                                                                           pipeline_2["losses"])


def test_compute_partition_on_4_stages_and_3(pipeline_2: dict) -> None:
    """The shipped partition ("compute", by FLOPs) on 4 ranks as 4 stages (ZeRO-1) and on 3
    ranks as 3 stages: each stage holds the layers model/partition.py computed, and the losses
    are the 2-rank pipeline's."""
    from argonne_ds.model.partition import compute_partition, layer_flops

    flops = layer_flops(ArgonneConfig(**CONFIG), SEQ)
    for world in (4, 3):
        extra = {"pipeline": {"stages": world, "partition_method": "compute"}}
        results = run_distributed_test(_train, world_size=world, args=(world, 1, extra),
                                       timeout_s=240)
        bounds = compute_partition(flops, world)
        for stage, r in enumerate(results):
            layers = range(bounds[stage], bounds[stage + 1])
            want = {"embed_tokens.weight"} if 0 in layers else set()
            want |= {f"blocks.{i - 1}." for i in layers if 1 <= i <= CONFIG["num_hidden_layers"]}
            got = {k if not k.startswith("blocks.") else k[:k.index(".", 7) + 1]
                   for k in r["held"]} - {"norm.weight", "lm_head.weight"}
            assert got == want, (world, stage, sorted(got))
            assert r["losses"] == pytest.approx(pipeline_2["losses"], abs=1e-5)


def test_no_two_blocks_start_alike() -> None:
    reference = _reference_init()
    q = [reference[f"blocks.{i}.attn.q_proj.weight"] for i in range(CONFIG["num_hidden_layers"])]
    assert all(not torch.equal(q[i], q[j]) for i in range(len(q)) for j in range(i))
    again = _reference_init()
    assert all(torch.equal(again[k], v) for k, v in reference.items())


# ---- the whole job through the deepspeed launcher: 4 ranks as two "nodes" x 2 ----------------


@pytest.mark.parametrize(("stages", "zero"), [(2, 1), (0, 3)], ids=["pipeline", "zero3"])
def test_activation_checkpointing_from_the_json_changes_no_loss(pipeline_2: dict, stages: int,
                                                                 zero: int) -> None:
    """DeepSpeed's "activation_checkpointing" section switches per-block recomputation on in
    either mode; the losses stay bitwise those of the run that kept its activations."""
    plain = pipeline_2 if stages else run_distributed_test(
        _train, world_size=2, args=(stages, zero), timeout_s=240)[0]
    recomputed = run_distributed_test(_train, world_size=2, timeout_s=240, args=(
        stages, zero, {"activation_checkpointing": {}}))
    assert all(r["recomputed"] for r in recomputed) and not plain["recomputed"]
    assert recomputed[0]["losses"] == plain["losses"]


@pytest.mark.parametrize(("stages", "zero"), [(2, 1), (0, 3)], ids=["pipeline", "zero3"])
def test_torch_compile_from_the_json_keeps_the_losses(pipeline_2: dict, stages: int,
                                                      zero: int) -> None:
    """"torch_compile" compiles every block (inductor, on CPU here) of each stage or of the
    ZeRO-3 model; the losses stay those of the eager run within float rounding (inductor fuses
    and reorders), with activation checkpointing too."""
    plain = pipeline_2  # every layout gives its losses within 1e-5 (above)
    extra = {"torch_compile": {"enabled": True, "backend": "inductor"},
             "activation_checkpointing": {}}
    compiled = run_distributed_test(_train, world_size=2, timeout_s=480,
                                    args=(stages, zero, extra))
    per_rank = CONFIG["num_hidden_layers"] // max(1, stages)
    assert [r["compiled"] for r in compiled] == [per_rank] * 2 and not plain["compiled"]
    assert compiled[0]["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=2e-5)


@pytest.mark.distributed
def test_pipeline_x_data_parallel_as_two_nodes(ws, tmp_path: Path) -> None:
    """2 stages x 2 replicas on two "nodes" (hostfile, one launcher per node) with eval and
    samples: the losses of the 2-rank pipeline; SIGKILL + resume on 4 ranks exact; its
    checkpoint resumed as ZeRO-3 on 2 ranks exact (the global batch, 16, is the JSON's)."""
    common = ("--max-steps", "8", "--save-interval", "4", "--eval-interval", "4",
              "--eval-data-glob", ws["glob"], "--sample-interval", "4", "--sample-tokens", "4")
    ref2 = tmp_path / "ref2"
    run(train_cmd(ws, "cpu_pipeline.json", ref2, *common))

    nodes = tmp_path / "nodes"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    base = train_cmd(ws, "cpu_pipeline.json", nodes, *common, launcher="deepspeed")
    port = base[base.index("--master_port") + 1]
    procs = [subprocess.Popen(  # one launcher per node, node 1 first (as under Slurm)
        with_launcher(base, hostfile=str(hostfile), no_ssh=None, node_rank=str(k),
                      master_addr="127.0.0.1", master_port=port),
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True) for k in (1, 0)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "pipeline on 4 ranks (data-parallel 2)" in outputs[1]
    assert "[eval] step 8" in outputs[1] and "[sample] step 8" in outputs[1]
    a, r = steps(nodes), steps(ref2)
    assert sorted(a) == list(range(1, 9))
    for s in range(1, 9):
        assert a[s]["loss"] == pytest.approx(r[s]["loss"], abs=1e-5), s
        assert a[s]["tokens"] == r[s]["tokens"] == s * 16 * 32

    killed = tmp_path / "killed"
    def four() -> list[str]:
        return with_launcher(train_cmd(ws, "cpu_pipeline.json", killed, *common), num_gpus="4",
                       master_port=str(free_port()))

    run_until_step_then(four(), killed, 6, signal.SIGKILL, timeout=300)
    time.sleep(1)
    run(four(), timeout=300)
    b = steps(killed)
    assert [b[s]["loss"] for s in range(1, 9)] == [a[s]["loss"] for s in range(1, 9)]
    assert [b[s]["data_crc"] for s in range(1, 9)] == [a[s]["data_crc"] for s in range(1, 9)]

    swapped = tmp_path / "swapped"
    shutil.copytree(nodes / "checkpoints" / "global_step4",
                    swapped / "checkpoints" / "global_step4")
    out = run(train_cmd(ws, "cpu_zero3.json", swapped, *common), timeout=300).stdout
    assert "across layouts: step 4" in out
    c = steps(swapped)
    for s in range(5, 9):
        assert c[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
    # The held-out eval also gives the loss by position, under ZeRO-3 and under the pipeline
    # (its head returns each position's loss): the buckets average back to the eval loss.
    for run_dir in (swapped, nodes):
        last = [r for r in read_metrics(run_dir) if r.get("event") == "eval"][-1]
        spans = {k.split("/", 1)[1]: v for k, v in last.items()
                 if k.startswith("eval_loss_pos/")}
        assert list(spans) == ["0-3", "4-7", "8-15", "16-31"], run_dir
        assert sum(v * n for v, n in zip(spans.values(), (4, 4, 8, 16))) / 32 == \
            pytest.approx(last["eval_loss"], rel=1e-4), run_dir


def _check_dirs(rank: int, world: int, root: str, shared: bool) -> str:
    from argonne_ds.engine.distributed import check_shared_dirs

    # Not shared: each rank looks at a folder of its own, as nodes with local disks would.
    out = f"{root}/out" if shared else f"{root}/out-rank{rank}"
    try:
        check_shared_dirs({"--output-dir": out, "--cache-dir": f"{root}/cache"}, wait_s=1)
    except ValueError as e:
        return str(e)
    return "ok"


@pytest.mark.distributed
def test_a_folder_the_nodes_do_not_share_is_refused(tmp_path: Path) -> None:
    ok = run_distributed_test(_check_dirs, 2, args=(str(tmp_path), True), timeout_s=60)
    assert ok == ["ok", "ok"]
    assert not list(tmp_path.rglob(".argonne-shared-*"))  # the markers are cleaned up
    refused = run_distributed_test(_check_dirs, 2, args=(str(tmp_path), False), timeout_s=60)
    for rank, message in enumerate(refused):  # every rank stops, naming the folder it was given
        assert f"--output-dir {tmp_path}/out-rank{rank} is not the same folder on every node" \
            in message


@pytest.mark.distributed
@pytest.mark.slow
def test_data_parallel_streaming_tokenizes_once(ws, tmp_path: Path) -> None:
    """Without --cache-dir, 2 data-parallel ranks share one token cache (built once, in the
    working directory) instead of each tokenizing the whole stream; the blocks are the ones the
    prepared cache gives."""
    cached = tmp_path / "cached"
    run(train_cmd(ws, "cpu_zero3.json", cached, "--max-steps", "3"))
    cmd = train_cmd(ws, "cpu_zero3.json", tmp_path / "streamed", "--max-steps", "3")
    i = cmd.index("--cache-dir")
    del cmd[i:i + 2]
    proc = run(cmd, timeout=300, cwd=tmp_path)
    assert "the 2 data-parallel ranks share a token cache in .argonne_cache" in proc.stdout
    assert list((tmp_path / ".argonne_cache" / "tokens").glob("*.bin"))
    a, b = steps(cached), steps(tmp_path / "streamed")
    assert [a[s]["data_crc"] for s in (1, 2, 3)] == [b[s]["data_crc"] for s in (1, 2, 3)]
    assert [a[s]["loss"] for s in (1, 2, 3)] == [b[s]["loss"] for s in (1, 2, 3)]
