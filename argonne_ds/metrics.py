"""Seeing the job: FLOPs/MFU, and the metrics sinks (console line, JSONL file, wandb).

wandb is initialised here rather than through DeepSpeed's monitor because a resumed job must
continue the same run: the run id lives in the checkpoint and goes to `wandb.init(id=...)`,
which DeepSpeed's WandbMonitor does not pass. Its mode: WANDB_MODE when set, else online when
wandb credentials are there (`wandb login` or WANDB_API_KEY), else offline (`wandb_mode`).
"""

from __future__ import annotations

import configparser
import json
import logging
import netrc
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.partition import layer_flops

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s from the datasheets (the MFU denominator), matched against
# torch.cuda.get_device_name() in this order: the first key found in the name wins, so the
# variants come before their family ("NVIDIA H100 PCIe" is 756, "NVIDIA H100 80GB HBM3" the SXM
# part at 989; "NVIDIA GH200 480GB" before "H200").
PEAK_TFLOPS: dict[str, float] = {
    "GH200": 989.0, "H200": 989.0,
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
    "A100": 312.0, "L40S": 362.0, "A10": 125.0,
    "MI300X": 1307.0, "B200": 2250.0,
}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def flops_per_token(config: ArgonneConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x the forward FLOPs of every layer (model/info.py: 2 x the
    matmul parameters, the head included and the embedding lookup not, plus causal attention,
    which scores each query against (T + 1) / 2 keys on average, not T)."""
    return 3 * sum(layer_flops(config, seq_len))


def say(rank0: bool, line: str, bar: Any = None) -> None:
    """A line for the person watching, from rank 0 only; above the progress bar when one runs."""
    if not rank0:
        return
    if bar is not None and not bar.disable:
        bar.write(line)
    else:
        print(line, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _wandb_hosts(base_url: str | None) -> list[str]:
    """The netrc machine names wandb looks up for its server, in its order: the server's host,
    then the W&B API host behind a CoreWeave Forge address (wandb >= 0.2x defaults to Forge,
    and older `wandb login` wrote `machine api.wandb.ai`)."""
    try:
        from wandb.sdk.lib import urls  # wandb's own URL rules; no network

        url = urls.normalize_forge_base_url(base_url or urls.DEFAULT_BASE_URL)
        candidates = [url, urls.forge_upstream_url(url)]
    except (ImportError, AttributeError, ValueError):  # another wandb layout, or a bad URL
        candidates = [base_url or "https://api.wandb.ai"]
    hosts = [urlsplit(u).netloc for u in candidates]
    return [h for i, h in enumerate(hosts) if h and h not in hosts[:i]]


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _wandb_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The global wandb settings file (`wandb login --host` writes base_url there)."""
    config_dir = Path(env["WANDB_CONFIG_DIR"]).expanduser() if env.get("WANDB_CONFIG_DIR") else (
        _home(env) / ".config" / "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
        return dict(parser.items("default"))
    except (OSError, configparser.Error):  # unreadable or no [default]: as wandb, treat as empty
        return {}


def default_netrc_path(env: Mapping[str, str]) -> Path:
    """Where wandb reads (and `wandb login` writes) its key: $NETRC, else ~/.netrc, else an
    existing ~/_netrc (wandb's wbnetrc._get_netrc_file_path)."""
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    home = _home(env)
    unix, windows = home / ".netrc", home / "_netrc"
    return windows if not unix.exists() and windows.exists() else unix


def wandb_mode(env: Mapping[str, str], netrc_path: Path | None = None) -> tuple[str, str]:
    """(mode for wandb.init, why). Mirrors wandb's own credential lookup (environment, then the
    netrc entry for its server) without contacting the server, so that a job whose user ran
    `wandb login` logs online and one without credentials does not fail or prompt."""
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"], "WANDB_MODE is set"
    if env.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    if env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online", "WANDB_IDENTITY_TOKEN_FILE is set"
    path = netrc_path or default_netrc_path(env)
    hosts = _wandb_hosts(env.get("WANDB_BASE_URL") or _wandb_settings(env).get("base_url"))
    try:
        entries = netrc.netrc(str(path))
    except FileNotFoundError:
        return "offline", f"no WANDB_API_KEY and no {path}"
    except (netrc.NetrcParseError, OSError) as e:
        return "offline", f"no WANDB_API_KEY and {path} is unreadable ({e})"
    for host in hosts:
        creds = entries.authenticators(host)
        if creds and creds[2]:
            return "online", f"{path} has a key for {host}"
    return "offline", f"no WANDB_API_KEY and no key for {' or '.join(hosts)} in {path}"


STEP_METRIC = "train/step"


class MetricsSink:
    """Rank 0 only: every record goes to output_dir/metrics.jsonl (always) and to wandb (mode from
    `wandb_mode`: WANDB_MODE, else online with credentials, else offline)."""

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
        # The mode goes to wandb.init rather than os.environ: the rest of the process (and any
        # child it starts) keeps seeing the user's environment.
        mode, why = wandb_mode(os.environ)
        if mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project),
                                        id=self.run_id, resume="allow", config=config,
                                        dir=os.environ.get("WANDB_DIR", str(output_dir)),
                                        mode=mode, settings=wandb.Settings(quiet=True))
            except Exception as e:  # noqa: BLE001 - metrics must never kill training
                logger.warning("wandb unavailable (%s); metrics go to %s only", e, self.path)
            else:
                # Charts run on the training step as a metric, not on wandb's own step: a job
                # resumed from an earlier checkpoint (a rollback, a replay after a crash) logs
                # steps it logged before, which wandb drops when given as its step.
                self.wandb.define_metric(STEP_METRIC)
                self.wandb.define_metric("*", step_metric=STEP_METRIC)
                if mode == "offline" and not os.environ.get("WANDB_MODE"):
                    logger.info("wandb is offline: %s. To log online run `wandb login` (or set "
                                "WANDB_API_KEY) before training; to upload this run later: "
                                "wandb sync %s", why, offline_run_dir(self.wandb))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({**{k: v for k, v in record.items() if isinstance(v, int | float)
                               and k != "step"}, STEP_METRIC: record.get("step")})

    def text(self, step: int, key: str, text: str) -> None:
        self.log({"step": step, "event": key, key: text})
        if self.wandb is not None:
            self.wandb.log({key: text, STEP_METRIC: step})

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def offline_run_dir(run: Any) -> str:
    """The folder `wandb sync` takes for a run: <dir>/wandb/offline-run-<time>-<id>."""
    sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
    return str(sync_dir) if sync_dir else str(Path(run.dir).parent)
