"""The launch scripts (launch/): they parse, compose the right `deepspeed ... argonne-ds train`
command, write the hostfile and requeue under Slurm (with stand-ins for scontrol/srun/deepspeed),
and, for real on 2 CPU ranks: two simulated nodes, the ssh (pdsh) launch with .deepspeed_env,
and a signal to train.sh that checkpoints and resumes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from argonne_ds.testing import free_port
from tests.train_helpers import (
    LAUNCH,
    finish,
    make_workspace,
    read_metrics,
    script_env,
    start,
    steps,
    tiny_job,
    train_sh,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
TIMEOUT = 240  # s, per distributed test: a hung rendezvous fails the test instead of CI


def stub(folder: Path, name: str, body: str) -> None:
    """An executable bash script `name` in `folder` (put first on PATH to stand in for a tool)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


# ---- static checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", "-s", "bash", *map(str, SCRIPTS)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_hostfile_example_is_what_deepspeed_parses() -> None:
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (LAUNCH / "hostfile.example").read_text().splitlines()
    assert dict(_parse_hostfile(lines)) == {"node0": 8, "node1": 8}


# ---- train.sh composes the launcher command (a stand-in deepspeed prints it) -------------------


@pytest.fixture
def fake_deepspeed(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "deepspeed", 'printf "%s\\n" "$@" > "$ARGS_OUT"\n')
    return bin_dir


def compose(bin_dir: Path, tmp_path: Path, *args: str, config: str = "ds_configs/pipeline.json",
            **variables: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    out = tmp_path / "args.txt"
    out.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(LAUNCH / "train.sh"), config, *args], capture_output=True,
                          text=True, timeout=60,
                          env=script_env(bin_dir, ARGS_OUT=str(out), **variables))
    return proc, out.read_text().splitlines() if out.is_file() else []


def flag(argv: list[str], name: str) -> list[str]:
    """The values after the last `name` in argv (up to the next --flag)."""
    i = len(argv) - 1 - argv[::-1].index(name)
    values = []
    for a in argv[i + 1:]:
        if a.startswith("--"):
            break
        values.append(a)
    return values


def test_train_sh_cluster_defaults(fake_deepspeed: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\ngpu1 slots=8\ngpu2 slots=8\n")
    proc, argv = compose(fake_deepspeed, tmp_path, HOSTFILE=str(hostfile),
                         TOKENIZER_PATH=str(tmp_path), DS_ENV_FILE=str(tmp_path / "dsenv"))
    assert proc.returncode == 0, proc.stderr
    assert flag(argv, "--hostfile") == [str(hostfile)] and "--no_ssh" not in argv
    assert argv[argv.index("--module") + 1:][:2] == ["argonne_ds.cli", "train"]
    assert flag(argv, "--deepspeed_config") == ["ds_configs/pipeline.json"]
    assert flag(argv, "--model") == ["argonne2"] and "--bf16" in argv
    assert flag(argv, "--tokenizer-path") == [str(tmp_path)]
    # Quoted for the remote shell that pdsh hands it to: argonne-ds expands the glob itself.
    assert flag(argv, "--data-glob") == ["'../data/CC-MAIN-2025-26/*.parquet'"]
    assert flag(argv, "--output-dir") == ["runs/argonne2-pipeline"]
    assert flag(argv, "--max-steps") == ["100000"] and flag(argv, "--block-size") == ["4096"]


@pytest.mark.parametrize(("script", "config"), [("train_pipeline.sh", "ds_configs/pipeline.json"),
                                                ("train_zero3.sh", "ds_configs/zero3.json")])
def test_wrappers_differ_only_in_the_json(fake_deepspeed: Path, tmp_path: Path, script: str,
                                          config: str) -> None:
    out = tmp_path / "args.txt"
    proc = subprocess.run(["bash", str(LAUNCH / script), "--seed", "7"], capture_output=True,
                          text=True, timeout=60, env=script_env(
                              fake_deepspeed, ARGS_OUT=str(out), HOSTFILE="",
                              TOKENIZER_PATH="fallback"))
    assert proc.returncode == 0, proc.stderr
    argv = out.read_text().splitlines()
    assert flag(argv, "--deepspeed_config") == [config] and argv[-2:] == ["--seed", "7"]


def test_train_sh_overrides_and_passthrough(fake_deepspeed: Path, tmp_path: Path) -> None:
    proc, argv = compose(fake_deepspeed, tmp_path, "--fp32", "--max-tokens", "1000000",
                         "--tokenizer-path=/tok", config="ds_configs/zero3.json", HOSTFILE="",
                         NUM_GPUS="4", MODEL="tiny", DATA_GLOB="a/*.parquet b/c_[12].parquet",
                         BATCH_SIZE="2", EVAL_DATA_GLOB="held/*.parquet")
    assert proc.returncode == 0, proc.stderr
    assert flag(argv, "--num_gpus") == ["4"] and "--hostfile" not in argv
    assert flag(argv, "--data-glob") == ["a/*.parquet", "b/c_[12].parquet"]  # not expanded
    assert flag(argv, "--eval-data-glob") == ["held/*.parquet"]
    assert flag(argv, "--eval-interval") == ["1000"]
    assert flag(argv, "--batch-size") == ["2"] and "--gradient-accumulation-steps" not in argv
    assert flag(argv, "--output-dir") == ["runs/tiny-zero3"]
    # A passed precision replaces the default one (argparse refuses two); a token budget drops
    # the default step budget (which would win); a passed tokenizer needs no TOKENIZER_PATH.
    assert "--fp32" in argv and "--bf16" not in argv
    assert "--max-steps" not in argv and flag(argv, "--max-tokens") == ["1000000"]
    assert argv[-1] == "--tokenizer-path=/tok"


def test_train_sh_per_node_mode(fake_deepspeed: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("\n# comment\nnodeA slots=4\nnodeB slots=4\n")
    proc, argv = compose(fake_deepspeed, tmp_path, HOSTFILE=str(hostfile), NODE_RANK="1",
                         TOKENIZER_PATH="fallback", MASTER_PORT="29555")
    assert proc.returncode == 0, proc.stderr
    assert "--no_ssh" in argv and flag(argv, "--node_rank") == ["1"]
    assert flag(argv, "--master_addr") == ["nodeA"] and flag(argv, "--master_port") == ["29555"]
    assert "--tokenizer-path" not in argv  # fallback: argonne-ds trains one
    assert flag(argv, "--data-glob") == ["../data/CC-MAIN-2025-26/*.parquet"]  # no remote shell


def test_train_sh_writes_deepspeed_env_for_ssh_nodes(fake_deepspeed: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu1 slots=8\ngpu2 slots=8\n")
    env_file = tmp_path / "dsenv"
    env_file.write_text("KEEP_ME=1\nWANDB_PROJECT=stale\n")
    proc, _ = compose(fake_deepspeed, tmp_path, HOSTFILE=str(hostfile),
                      TOKENIZER_PATH="fallback", DS_ENV_FILE=str(env_file),
                      WANDB_PROJECT="argonne", WANDB_API_KEY="secret", HF_TOKEN="secret",
                      NCCL_DEBUG="WARN",
                      HF_HOME="/models/hf", WANDB_NOTES='has "quotes"', UNRELATED="x")
    assert proc.returncode == 0, proc.stderr
    lines = env_file.read_text().splitlines()
    assert {"KEEP_ME=1", "WANDB_PROJECT=argonne", "NCCL_DEBUG=WARN", "HF_HOME=/models/hf",
            "OMP_NUM_THREADS=1"} <= set(lines)
    names = [line.split("=", 1)[0] for line in lines]
    assert len(names) == len(set(names))
    assert not {"WANDB_API_KEY", "HF_TOKEN", "UNRELATED"} & set(names)
    assert "WANDB_NOTES" not in names and "WANDB_NOTES" in proc.stderr  # said, not mangled


@pytest.mark.parametrize(("variables", "message"), [
    ({"HOSTFILE": "", "TOKENIZER_PATH": ""}, "set TOKENIZER_PATH"),
    ({"HOSTFILE": "/nonexistent/hostfile", "TOKENIZER_PATH": "fallback"}, "hostfile.example"),
    ({"HOSTFILE": "", "TOKENIZER_PATH": "fallback", "PRECISION": "bf32"}, "PRECISION"),
])
def test_train_sh_refuses_with_a_message(fake_deepspeed: Path, tmp_path: Path,
                                         variables: dict[str, str], message: str) -> None:
    proc, argv = compose(fake_deepspeed, tmp_path, **variables)
    assert proc.returncode == 2 and message in proc.stderr and not argv


# ---- slurm.sbatch with stand-ins for scontrol, srun and the per-node command -------------------


@pytest.fixture
def slurm(tmp_path: Path) -> dict:
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm.log"
    stub(bin_dir, "scontrol", """\
        case $1 in
            show) printf 'gpu-a01\\ngpu-a02\\n' ;;   # show hostnames gpu-a[01-02]
            requeue) echo "requeue $2" >> "$SLURM_LOG" ;;
        esac
        """)
    # srun: one copy of the command per node, with that node's SLURM_NODEID; forwards SIGUSR1.
    stub(bin_dir, "srun", """\
        echo "srun $*" >> "$SLURM_LOG"
        while [ "${1#--}" != "$1" ]; do shift; done
        pids=()
        trap 'kill -USR1 "${pids[@]}"' USR1
        for id in 0 1; do SLURM_NODEID=$id "$@" & pids+=($!); done
        rc=0
        for p in "${pids[@]}"; do
            while :; do wait "$p" && s=0 || s=$?; kill -0 "$p" 2>/dev/null || break; done
            [ "$s" = 0 ] || rc=$s
        done
        exit $rc
        """)
    # The per-node command (train.sh in real jobs): reports, then waits for SIGUSR1 ("saves").
    stub(bin_dir, "node.sh", """\
        echo "node $NODE_RANK: $HOSTFILE $MASTER_ADDR:$MASTER_PORT args $*" >> "$SLURM_LOG"
        echo "node $NODE_RANK: launch $ARGONNE_RESTART, MAX_RESTARTS=$MAX_RESTARTS" >> "$SLURM_LOG"
        trap 'echo "node $NODE_RANK: SIGUSR1" >> "$SLURM_LOG"; exit 0' USR1
        # EXITS="75 0": node 1 exits 75 on the first launch, 0 on the second (node 0 exits 0).
        if [ -n "${EXITS:-}" ]; then
            read -r -a codes <<< "$EXITS"
            [ "$NODE_RANK" = 1 ] && exit "${codes[$ARGONNE_RESTART]}"
            exit 0
        fi
        [ -n "${FINISH_AT_ONCE:-}" ] && exit 0
        touch "$SLURM_LOG.ready$NODE_RANK"
        for _ in $(seq 300); do sleep 0.1; done
        exit 1
        """)
    e = script_env(bin_dir, SLURM_LOG=str(log), SLURM_JOB_ID="4242",
                   SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_GPUS_ON_NODE="4",
                   SLURM_SUBMIT_DIR=str(ROOT), TRAIN_SCRIPT=str(bin_dir / "node.sh"),
                   HOSTFILE=str(tmp_path / "hostfile"), DS_CONFIG="ds_configs/zero3.json")
    return {"env": e, "log": log, "hostfile": tmp_path / "hostfile"}


def run_sbatch(slurm: dict, usr1: bool, **variables: str) -> tuple[int, str]:
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--max-steps", "7"],
                            env={**slurm["env"], **variables}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        if usr1:  # as Slurm does 300 s before the time limit (--signal=B:USR1@300)
            deadline = time.monotonic() + 30
            while not all(Path(f"{slurm['log']}.ready{i}").exists() for i in (0, 1)):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
                time.sleep(0.05)
            proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_slurm_writes_hostfile_and_requeues_on_time_limit(slurm: dict) -> None:
    code, out = run_sbatch(slurm, usr1=True)
    assert code == 0, out
    assert slurm["hostfile"].read_text() == "gpu-a01 slots=4\ngpu-a02 slots=4\n"
    log = slurm["log"].read_text()
    assert "srun --nodes=2 --ntasks-per-node=1" in log
    for rank in (0, 1):
        assert (f"node {rank}: {slurm['hostfile']} gpu-a01:{20000 + 4242} args "
                "ds_configs/zero3.json --max-steps 7") in log
        assert f"node {rank}: SIGUSR1" in log
    assert log.rstrip().endswith("requeue 4242")


def test_slurm_does_not_requeue_a_finished_job(slurm: dict) -> None:
    slurm["env"]["FINISH_AT_ONCE"] = "1"
    code, out = run_sbatch(slurm, usr1=False)
    assert code == 0, out
    assert "requeue 4242" not in slurm["log"].read_text().splitlines()


@pytest.mark.parametrize(("exits", "launches", "code"), [
    ("75 0", 2, 0),  # a hang or an OOM on one node: all nodes relaunch together, then finish
    ("1 1 1", 3, 1),  # MAX_RESTARTS=2 relaunches, then the failure stands
    ("3", 1, 3),  # does not fit: a relaunch would fail the same way
], ids=["relaunched", "used-up", "not-relaunched"])
def test_slurm_relaunches_all_nodes_together(slurm: dict, exits: str, launches: int,
                                             code: int) -> None:
    got, out = run_sbatch(slurm, usr1=False, EXITS=exits, MAX_RESTARTS="2", RESTART_DELAY="0")
    log = slurm["log"].read_text()
    assert got == code, out
    assert log.count("srun --nodes=2") == launches
    for launch in range(launches):  # the nodes' own train.sh never relaunches alone
        assert log.count(f"launch {launch}, MAX_RESTARTS=0") == 2
    assert ("relaunch 1 of 2 on all nodes" in out) == (launches > 1)


# ---- for real: 2 CPU ranks through the deepspeed launcher -------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_workspace(tmp_path_factory.mktemp("launch"))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_simulated_nodes(ws, tmp_path: Path) -> None:
    """A 2-name hostfile and one launcher per "node" (--no_ssh --node_rank 0/1), as slurm.sbatch
    runs them: one 2-rank job, a 2-stage pipeline with one stage per node."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "out"
    job = tiny_job(ws, out, HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MAX_STEPS="4")
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    procs = [start(train_sh(), {**job, "NODE_RANK": str(i)}, logs[i]) for i in (1, 0)][::-1]
    codes = finish(procs, time.monotonic() + TIMEOUT)
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in text)
    for i in (0, 1):
        assert f"nnodes=2, num_local_procs=1, node_rank={i}" in text[i]
    assert "pipeline on 2 ranks" in text[0] and "checkpoints/global_step4" in text[0]
    assert sorted(steps(out)) == [1, 2, 3, 4]


@pytest.mark.distributed
@pytest.mark.slow
def test_signal_to_train_sh_checkpoints_then_resumes(ws, tmp_path: Path) -> None:
    """SIGTERM to train.sh (as quickstart.sh and a scheduler send it): the ranks save and exit 0,
    and the same command resumes from that checkpoint."""
    out = tmp_path / "out"
    job = tiny_job(ws, out, HOSTFILE="", NUM_GPUS="2", MAX_STEPS="30")
    proc = start(train_sh(), job, tmp_path / "a.log")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ((out / "metrics.jsonl").is_file()
                   and any(r.get("step", 0) >= 3 for r in read_metrics(out))):
            assert proc.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "step 3 not reached"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
    finally:
        code = finish([proc], deadline)[0]
    first = (tmp_path / "a.log").read_text()
    assert code == 0, first[-3000:]
    stopped = max(steps(out))
    assert 3 <= stopped < 30 and f"checkpoint at step {stopped} saved" in first
    job["MASTER_PORT"] = str(free_port())
    code = finish([start(train_sh(), job, tmp_path / "b.log")], time.monotonic() + TIMEOUT)[0]
    second = (tmp_path / "b.log").read_text()
    assert code == 0, second[-3000:]
    assert f"resumed from {out / 'checkpoints'}/global_step{stopped}" in second
    assert sorted(steps(out)) == list(range(1, 31))


@pytest.mark.distributed
@pytest.mark.slow
def test_ssh_launch_forwards_deepspeed_env(ws, tmp_path: Path) -> None:
    """The default multi-node launch (pdsh over ssh), with a pdsh stand-in that runs each node's
    command here in an empty environment, as a fresh ssh login would: the ranks see only what
    DeepSpeed forwards, and WANDB_DIR arrives through the .deepspeed_env train.sh wrote."""
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "pdsh", """\
        while [ $# -gt 0 ]; do
            case $1 in -w) hosts=$2; shift 2 ;; -f) shift 2 ;; -S) shift ;; *) break ;; esac
        done
        IFS=, read -r -a names <<< "$hosts"
        pids=()
        for i in "${!names[@]}"; do  # pdsh's %n: the node's index
            env -i HOME="$HOME" PATH=/usr/bin:/bin bash -c "${*//%n/$i}" & pids+=($!)
        done
        rc=0
        for p in "${pids[@]}"; do wait "$p" || rc=$?; done
        exit $rc
        """)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    wandb_dir.mkdir()
    job = tiny_job(ws, out, HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MAX_STEPS="4",
                   DS_ENV_FILE=str(tmp_path / "deepspeed_env"), WANDB_DIR=str(wandb_dir),
                   DS_LAUNCHER_ARGS="--no_ssh_check")
    code = finish([start(train_sh(), job, tmp_path / "log", bin_dir)],
                  time.monotonic() + TIMEOUT)[0]
    text = (tmp_path / "log").read_text()
    assert code == 0, text[-3000:]
    assert f"WANDB_DIR={wandb_dir}" in (tmp_path / "deepspeed_env").read_text()
    assert "pipeline on 2 ranks" in text and sorted(steps(out)) == [1, 2, 3, 4]
    assert list(wandb_dir.glob("wandb/offline-run-*")), "WANDB_DIR did not reach rank 0"


def test_train_sh_with_a_run_config(fake_deepspeed: Path, tmp_path: Path) -> None:
    """With a run config the file holds the run: only variables that are set and flags given
    become flags (none of the script's cluster defaults would override the file)."""
    config = "launch/configs/argonne2_zero3.yaml"
    proc, argv = compose(fake_deepspeed, tmp_path, "--max-steps", "7", config=config,
                         HOSTFILE="", LR="1e-4")
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("train") + 1:] == ["--config", config, "--learning-rate", "1e-4",
                                              "--max-steps", "7"]
    proc, _ = compose(fake_deepspeed, tmp_path, config="launch/configs/nope.yaml", HOSTFILE="")
    assert proc.returncode == 2 and "run config launch/configs/nope.yaml not found" in proc.stderr
