"""Timed runs and where they ran: the tau convention every command prints, `run_engine` (one timed engine
generation), device syncs, and the machine's name (`cpu_model` is used by benchmarks/ too).
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


CONVENTION = "tau = accepted draft tokens per step (paper convention); tokens per target forward = tau + 1"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: torch.device) -> str:
    """CPU model and core count, plus the GPU name on CUDA."""
    name = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} ({name})"
    return name


def run_engine(engine, inputs: dict, max_new_tokens: int, device: torch.device, **kwargs) -> dict:
    """One engine generation: new token ids, stats and wall-clock seconds."""
    sync(device)
    start = time.perf_counter()
    sequences, stats = engine.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    prompt_len = inputs["input_ids"].shape[1]
    return {"ids": sequences[0, prompt_len:].tolist(), "stats": stats, "seconds": seconds}
