"""Running `argonne-ds train` for real in tests, 2 CPU ranks: on local ranks forked from the
preloaded forkserver (argonne_ds.testing.launch, the default: no launcher's three interpreters
to start) or, where the launcher is what a test is about, through the deepspeed launcher."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from argonne_ds.testing import LocalJob, cpu_env, free_port, run_local, start_local
from tests.data_helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
MODEL = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
         "max_position_embeddings": 64}


def make_workspace(root: Path) -> dict[str, str]:
    """A corpus, a model JSON, and a token cache prepared once (with a 512-id fallback BPE)."""
    write_corpus(root / "shards", docs_per_shard=(120, 90, 150))
    (root / "model.json").write_text(json.dumps(MODEL))
    from argonne_ds.cli import main

    assert main(["prepare", "--data-glob", str(root / "shards" / "*.parquet"), "--cache-dir",
                 str(root / "cache"), "--fallback-vocab-size", "512", "--no-progress"]) == 0
    return {"glob": str(root / "shards" / "*.parquet"), "cache": str(root / "cache"),
            "model": str(root / "model.json")}


# train_cmd's first word for a job on local ranks (then the rank count, then the CLI's argv).
LOCAL = "<local ranks>"


def train_cmd(ws: dict[str, str], ds_config: str, out: Path, *extra: str,
              launcher: str = "local") -> list[str]:
    """The command of a 2-rank training job: `launcher` "local" (argonne_ds.testing.launch),
    "deepspeed" (the deepspeed launcher) or "torchrun"."""
    args = ["train", "--data-glob", ws["glob"], "--cache-dir", ws["cache"],
            "--fallback-vocab-size", "512", "--model", ws["model"],
            "--deepspeed_config", str(ROOT / "ds_configs" / ds_config), "--block-size", "32",
            "--learning-rate", "3e-3", "--min-learning-rate", "3e-4", "--warmup-steps", "3",
            "--output-dir", str(out), "--log-interval", "4", *extra]
    if launcher == "local":
        return [LOCAL, "2", *args]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(free_port()), "--module", "argonne_ds.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "argonne_ds.cli", *args]


def with_launcher(cmd: list[str], **launcher: str | None) -> list[str]:
    """train_cmd's command with other launcher flags (e.g. num_gpus="4", or a hostfile node;
    None: a flag without a value). A local job takes num_gpus (and picks its own free port)."""
    if cmd[0] == LOCAL:
        if set(launcher) - {"num_gpus", "master_port"}:
            raise ValueError(f"a local job takes num_gpus only, not {sorted(launcher)}")
        return [LOCAL, str(launcher.get("num_gpus", cmd[1])), *cmd[2:]]
    i, j = cmd.index("deepspeed.launcher.runner") + 1, cmd.index("--module")
    flags = [x for k, v in launcher.items() for x in ([f"--{k}"] if v is None else [f"--{k}", v])]
    return [*cmd[:i], *flags, *cmd[j:]]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}  # wandb/ in --output-dir
    return {**base, **cpu_env(), "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT),
            **(extra or {})}


def run(cmd: list[str], timeout: float = 240, extra_env: dict[str, str] | None = None,
        cwd: Path | None = None, codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    if cmd[0] == LOCAL:
        proc = run_local(cmd[2:], _log_dir(), int(cmd[1]), env(extra_env), timeout, cwd)
    else:
        proc = subprocess.run(cmd, env=env(extra_env), capture_output=True, text=True,
                              timeout=timeout, start_new_session=True, cwd=cwd)
    if proc.returncode not in codes:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def run_expect_fail(command: list[str], timeout: float = 120) -> str:
    """Run a job that must fail; its output (stdout and stderr tails)."""
    try:
        run(command, timeout=timeout)
    except AssertionError as e:
        return str(e)
    raise AssertionError("the job should have failed")


def start_job(cmd: list[str], extra_env: dict[str, str] | None = None) -> LocalJob:
    """A local job (train_cmd's default) started in the background."""
    assert cmd[0] == LOCAL, "start_job takes a local job's command"
    return start_local(cmd[2:], _log_dir(), int(cmd[1]), env(extra_env))


def run_until_step_then(cmd: list[str], out: Path, step: int, sig: int, timeout: float = 240,
                        ranks_only: bool = False) -> tuple[int, str]:
    """Start the job, wait until metrics.jsonl shows `step`, send `sig` to the whole process
    group (launcher and ranks, like a node going down) or to the rank processes only (like a
    scheduler's preemption signal); return (the launcher's exit code, output)."""
    if cmd[0] == LOCAL:
        return _local_until_step_then(start_local(cmd[2:], _log_dir(), int(cmd[1]), env()),
                                      out, step, sig, timeout)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"job ended before step {step}:\n{proc.stdout.read()}")
            if metrics.is_file() and any(r.get("step", 0) >= step and "loss" in r
                                         for r in read_metrics(out)):
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"step {step} not reached in {timeout} s")
        if ranks_only:
            import psutil

            for child in psutil.Process(proc.pid).children(recursive=True):
                line = " ".join(child.cmdline())
                if "argonne_ds.cli" in line and "deepspeed.launcher" not in line:
                    child.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _local_until_step_then(job: LocalJob, out: Path, step: int, sig: int, timeout: float
                           ) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    try:
        while not _reached(out, step):
            if job.poll() is not None:
                raise AssertionError(f"job ended before step {step}:\n{job.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"step {step} not reached in {timeout} s")
            time.sleep(0.02)
        if sig == signal.SIGKILL:  # a node going down: its helper processes too
            job.kill()
        else:
            job.send_signal(sig)
        return job.wait(max(1.0, deadline - time.monotonic())), job.output()
    finally:
        job.kill()


def _reached(out: Path, step: int) -> bool:
    return (out / "metrics.jsonl").is_file() and any(
        r.get("step", 0) >= step and "loss" in r for r in read_metrics(out))


def _log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="argonne-ranks-"))


def read_metrics(out: Path) -> list[dict]:
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by SIGKILL
            rows.append(json.loads(line))
    return rows


def steps(out: Path) -> dict[int, dict]:
    """The last record of each training step (a resumed run logs redone steps again)."""
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


# ---- through launch/train.sh -----------------------------------------------------------------


def script_env(bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The test environment, with `bin_dir` first on PATH and VIRTUAL_ENV set so that train.sh
    does not activate .venv in front of the stand-ins."""
    e = env({"VIRTUAL_ENV": os.environ.get("VIRTUAL_ENV", sys.prefix), **extra})
    path = [str(Path(sys.executable).parent), e["PATH"]]
    if bin_dir is not None:
        path.insert(0, str(bin_dir))
    e["PATH"] = os.pathsep.join(path)
    for var in ("HOSTFILE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ENV_FILE",
                "TOKENIZER_PATH", "MAX_TOKENS", "MAX_STEPS", "PRECISION"):
        if var not in extra:
            e.pop(var, None)
    return e


def tiny_job(ws: dict[str, str], out: Path, **extra: str) -> dict[str, str]:
    """train.sh's variables for a tiny fp32 job on the workspace's corpus."""
    return {"MODEL": ws["model"], "DATA_GLOB": ws["glob"], "CACHE_DIR": ws["cache"],
            "TOKENIZER_PATH": "fallback", "OUTPUT_DIR": str(out), "PRECISION": "",
            "BLOCK_SIZE": "32", "LR": "3e-3", "MIN_LR": "3e-4", "WARMUP_STEPS": "2",
            "LOG_INTERVAL": "2", "MASTER_PORT": str(free_port()), **extra}


def train_sh(config: str = "cpu_pipeline.json") -> list[str]:
    return ["bash", str(LAUNCH / "train.sh"), config if "/" in config else f"ds_configs/{config}",
            "--fallback-vocab-size", "512"]


def start(cmd: list[str], variables: dict[str, str], log: Path,
          bin_dir: Path | None = None) -> subprocess.Popen:
    # Its own process group: on a timeout the whole tree (launchers, ranks) is killed.
    return subprocess.Popen(cmd, env=script_env(bin_dir, **variables), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs: list[subprocess.Popen], deadline: float) -> list[int]:
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
