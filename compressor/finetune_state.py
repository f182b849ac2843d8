"""Adapter checkpoints of a fine-tuning run, and resuming from the latest one.

Layout of ``state_dir``: ``step-<N>/adapter.safetensors`` (the LoRA tensors only, never the base weights),
``step-<N>/trainer.pt`` (optimizer, LR schedule, step, rungs and losses so far, the settings a resume must share),
``step-<N>/rng_rank<R>.pt`` (each process's RNG states, so dropout continues bit-identically), and
``latest.json`` naming the newest complete checkpoint (written last, so a crash mid-save leaves the previous one).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .lora import adapter_state, load_adapter_state

LATEST = "latest.json"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(state_dir, peft_model, optimizer, scheduler, acc, run, key: dict) -> Path:
    """Write checkpoint ``step-<run.step>`` (every process writes its RNG; the main process the rest)."""
    root = Path(state_dir)
    ckpt = root / f"step-{run.step}"
    if acc.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), ckpt / f"rng_rank{acc.process_index}.pt")
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in adapter_state(peft_model).items()}, ckpt / "adapter.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "run": dataclasses.asdict(run), "key": key}, ckpt / "trainer.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        previous = latest_step(root)
        (root / LATEST).write_text(json.dumps({"step": run.step, "dir": ckpt.name}))
        if previous is not None and previous != run.step:
            shutil.rmtree(root / f"step-{previous}", ignore_errors=True)
    acc.wait_for_everyone()
    return ckpt


def latest_step(state_dir) -> int | None:
    path = Path(state_dir) / LATEST
    if not path.is_file():
        return None
    try:  # a damaged file is named: the JSON parser's message alone does not say which file it read
        step = json.loads(path.read_text())["step"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); delete the state directory to start "
                         "over") from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{path} is damaged (step {step!r}); delete the state directory to start over")
    return step


# States saved by earlier versions: distillation was recorded only when on, and some settings not at all
_LEGACY = {"distill": 0.0, "distill_temperature": 1.0}
_UNRECORDED = object()


def _changed(saved: dict, now: dict) -> dict:
    """{setting: (saved, now)} for every setting either side records that differs (one an older state never
    recorded is not compared)."""
    out = {}
    for k in saved.keys() | now.keys():
        old = saved.get(k, _LEGACY.get(k, _UNRECORDED))
        if old is not _UNRECORDED and old != now.get(k):
            out[k] = (old, now.get(k))
    return out


def load_state(state_dir, peft_model, optimizer, scheduler, rank: int, run_cls, key: dict):
    """Restore the newest checkpoint into the adapters, optimizer, schedule and RNG; return the run record
    (a fresh one when ``state_dir`` holds no checkpoint yet)."""
    step = latest_step(state_dir)
    if step is None:
        return None
    ckpt = Path(state_dir) / f"step-{step}"
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    changed = _changed(trainer["key"], key)
    if changed:
        raise ValueError(f"cannot resume from {ckpt}: settings differ from the saved run (saved, now): {changed}; "
                         "resume with the same settings or start a new state directory")
    rng = ckpt / f"rng_rank{rank}.pt"
    if not rng.is_file():
        raise ValueError(f"cannot resume from {ckpt}: no RNG state for process {rank}")
    load_adapter_state(peft_model, load_file(ckpt / "adapter.safetensors"))
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(torch.load(rng, weights_only=False))
    return run_cls(**trainer["run"])
