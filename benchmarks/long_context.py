"""Tokens/s and peak memory of one training step (forward + backward) at long context, with and
without sequence parallelism and activation checkpointing, for a reduced model on CPU.

    python benchmarks/long_context.py [--lengths 2048 8192 32768] [--sp 1 2] [--tiles 1 4]
        [--repeats 2]

Each length runs the plain model (fp32, chunked loss, micro-batch 1): with SP = 1 in this
process, with SP = P on P gloo ranks (engine/sequence.py attached to the plain model, as the
Engine does). Peak: torch's MemTracker over the step, beyond weights and gradients (the
quantity model/memory.py plans), per rank; beside it the plan's figure. Tokens/s: whole-step
wall time, the sequence's tokens over the slowest rank's time (median of --repeats after one
warm-up). Each rank runs one thread, so on 2 cores SP = 2 also uses the second core (its
speed-up here is that, not the method); what SP buys on GPUs is each rank's memory, which the
peak column shows. `--tiles`: the model's mlp_tiles (the MLP in pieces along the sequence, each
recomputed in backward). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from argonne_ds.config import ArgonneConfig  # noqa: E402

MODEL = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=384,
             max_position_embeddings=32768)


def _step(sp: int, seq: int, checkpointing: bool, repeats: int, tiles: int = 1, rank: int = 0
          ) -> tuple[float, int]:
    """(median step seconds, measured peak bytes) on this rank."""
    from argonne_ds.model.model import ArgonneModel
    from argonne_ds.testing import measured_step_peak

    prepare = None
    if sp > 1:
        from argonne_ds.engine.sequence import attach, init_groups

        group = init_groups(sp)

        def prepare(m: ArgonneModel) -> None:
            attach(m, sp, *group)

    config = ArgonneConfig(**MODEL, mlp_tiles=tiles)
    peak = measured_step_peak(config, 1, seq, torch.float32, checkpointing, True, prepare)
    torch.manual_seed(0)
    model = ArgonneModel(config).train()
    model.gradient_checkpointing = checkpointing
    if prepare is not None:
        prepare(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (1, seq), generator=g)
    times = []
    for i in range(repeats + 1):
        if sp > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        model(x, labels=x).loss.backward()
        if sp > 1:
            torch.distributed.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def _rank(rank: int, world: int, seq: int, checkpointing: bool, repeats: int, tiles: int
          ) -> tuple[float, int]:
    return _step(world, seq, checkpointing, repeats, tiles, rank)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from argonne_ds.model.memory import loss_path_bytes, step_activation_peak
    from argonne_ds.testing import run_distributed_test

    print(f"model {MODEL}, fp32, micro-batch 1, chunked loss; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'tokens':>7} {'SP':>3} {'tiles':>5} {'ckpt':>5} {'tok/s':>9} {'step s':>8} "
          f"{'peak MiB/rank':>14} {'plan MiB':>9}")
    for seq in args.lengths:
        for sp in args.sp:
            for tiles in args.tiles:
                config = ArgonneConfig(**MODEL, mlp_tiles=tiles)
                for ckpt in (False, True):
                    if sp == 1:
                        sec, peak = _step(1, seq, ckpt, args.repeats, tiles)
                        peaks = [peak]
                    else:
                        res = run_distributed_test(_rank, world_size=sp, timeout_s=3600,
                                                   args=(seq, ckpt, args.repeats, tiles))
                        sec, peaks = max(r[0] for r in res), [r[1] for r in res]
                    tokens = seq // sp
                    plan = step_activation_peak(config, config.num_hidden_layers, tokens, 4,
                                                ckpt, loss_path_bytes(config, tokens, 4, True),
                                                sp=sp)
                    print(f"{seq:>7} {sp:>3} {tiles:>5} {'on' if ckpt else 'off':>5} "
                          f"{seq / sec:>9,.0f} {sec:>8.2f} {max(peaks) / 2**20:>14.1f} "
                          f"{plan / 2**20:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
