"""Named fault points for the fault-injection tests; inert unless an environment variable asks.

`COLODIFFUSION_FAULT_POINT=name[@step]` makes `point(name)` (during the save of `step`, if given)
write the file named by `COLODIFFUSION_FAULT_MARK` and then sleep `COLODIFFUSION_FAULT_SLEEP`
seconds (default 60), so that a test can SIGKILL the process exactly there. In-process tests
monkeypatch `point` to raise instead (a "crash" at that moment). Production runs never set them.

Points, in the order a checkpoint save passes them: `tensors_written` (after each safetensors
file), `files_written` (all ranks wrote, nothing fsynced), `manifest_written` (before the rename),
`replaced_aside` (re-saving a step: the old folder moved aside),
`published` (renamed, `latest` not yet updated), `pruning` (an old checkpoint renamed aside,
not yet deleted). Before training, in order: `tokenizer_written`, `text_encoder_written` (a sealed
folder's files written, not sealed: `storage/sealed.py`), `first_stage` (mid-way through the
autoencoder's training), `scale_factor`, `vae_written`, `unet_built`; after it, `final_written`
(and `lora_written`) while final/ is exported.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

step: Optional[int] = None  # the step being saved (set by checkpoint.save)


def point(name: str) -> None:
    spec = os.environ.get("COLODIFFUSION_FAULT_POINT")
    if not spec:
        return
    want, _, at = spec.partition("@")
    if want != name or (at and (step is None or int(at) != step)):
        return
    mark = os.environ.get("COLODIFFUSION_FAULT_MARK")
    if mark:
        Path(mark).write_text(f"{name}@{step}\n")
    time.sleep(float(os.environ.get("COLODIFFUSION_FAULT_SLEEP", "60")))
