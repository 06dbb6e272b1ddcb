"""Torch files from elsewhere, read without running code from them.

`torch.load(weights_only=False)` unpickles: a file can name any callable (`os.system`) and have it
called while it loads. Every file argonne-ds did not write this run — an original Argonne
checkpoint (`import-original`), a checkpoint given to `export`, a trunk another run saved
(`--checkpoint-path`) — is read here with `weights_only=True`: tensors, numbers, strings, lists,
dicts, dtypes, plus the few plain DeepSpeed classes its checkpoints hold (`deepspeed_types`). A
file that needs anything else is refused with one line naming the file and the type; `trust=True`
(the commands' `--trust-pickle`) unpickles it fully, for a file whose maker you trust.

DeepSpeed itself loads its checkpoints with `weights_only=False` (`load_checkpoint`,
`zero_to_fp32`, `ds_to_universal`). Before a checkpoint from elsewhere reaches it, `verify_folder`
reads every `.pt` of it here (memory-mapped: the tensors' bytes are not read): a file the safe
loader accepts references no other global, so DeepSpeed's full unpickling of the same bytes builds
the same harmless objects. A run's own checkpoints are trusted (written by this job).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

TRUST_HINT = "pass --trust-pickle to load it anyway, only if you trust whoever made the file"


class UntrustedFileError(ValueError):
    """A file whose loading would run code from it, phrased for the user (one line)."""


def deepspeed_globals() -> list[type]:
    """The plain classes a DeepSpeed checkpoint pickles besides tensors (optimizer states)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # What 2,893 checkpoint files of the test suite (pipeline, ZeRO-1/3, bf16, universal) name
    # besides torch's own: an enum, the loss scalers (plain attributes) and a dataclass.
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, *, trust: bool = False, mmap: bool = False,
              deepspeed_types: bool = False, hint: str = TRUST_HINT) -> Any:
    """torch.load on the CPU without unpickling code (unless `trust`)."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    allowed = deepspeed_globals() if deepspeed_types else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a {found.group(1)}" if found else "an object torch's safe loader does not build"
        raise UntrustedFileError(
            f"{path}: refusing to load it: it holds {what}, which only a full unpickle builds, and "
            f"a full unpickle runs any code the file names; {hint}") from None


def verify_folder(folder: str | Path, hint: str = "") -> None:
    """Every .pt file under `folder` loads safely (else UntrustedFileError naming it): what
    makes DeepSpeed's own full unpickling of them harmless."""
    hint = hint or ("it is not a checkpoint argonne-ds or DeepSpeed writes; use one whose maker "
                    "you trust, or its weights through `export` / `--from-hf` (safetensors)")
    for path in sorted(Path(folder).rglob("*.pt")):
        safe_load(path, mmap=True, deepspeed_types=True, hint=hint)
