"""Where each split's images live: in memory (on the training device) or memory-mapped.

`dataset.in_memory=true` keeps every split in memory, as before; `false` memory-maps every
split; `auto` (the default) keeps a split in memory while it fits a budget of half the memory
available now (MemAvailable in /proc/meminfo; on CUDA also half the free device memory;
each shared out among a distributed run's processes on the machine or the GPU),
taking train first (it is sampled every iteration), then val, then test, and memory-maps the
rest. The reader's cache file is then opened with torch.load(mmap=True) when it is larger than
that budget (cache.mapped_above), so a split too large for memory is never read whole: its
tensor stays backed by the cache file (class-major uint8, the per-class index being the
classes x per_class layout and its counts), and a task batch reads only the pages of its
images. A split a reader built in memory (a subset or rotation of its cache) is written once
per run to an unlinked file beside the cache and mapped from there.
"""

import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from metatrain import distributed
from metatrain.data import FewShotSplits
from metatrain.data.cache import mapped_above
from metatrain.errors import MetatrainError

MODES = ("auto", "true", "false")
BUDGET_FRACTION = 0.5  # of the memory available when the run starts


def check_mode(mode) -> str:
    mode = str(mode).lower()  # YAML and the command line give true/false as booleans
    if mode not in MODES:
        raise MetatrainError(f"dataset.in_memory={mode!r}: use auto, true or false")
    return mode


def available_memory() -> int:
    """Bytes of host memory available without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device) -> int:
    """Half the memory available, shared by the processes that each load their own
    copy of the splits: those of a distributed run on this machine (for the host) and
    those on this GPU (more ranks than GPUs)."""
    local = distributed.env_local_world()
    budget = int(BUDGET_FRACTION * available_memory()) // local
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_gpu = -(-local // max(torch.cuda.device_count(), 1))  # ceil: ranks sharing a GPU
        budget = min(budget, int(BUDGET_FRACTION * free) // per_gpu)
    return budget


def budget(mode, device) -> int | None:
    """Bytes of images that may be held in memory; None: no limit. Measured once, before
    loading, so that what the load itself takes is not counted against it."""
    mode = check_mode(mode)
    return None if mode == "true" else 0 if mode == "false" else memory_budget(torch.device(device))


def loading(limit: int | None):
    """Context for the reader's load: map its cache file when the budget cannot hold it."""
    return nullcontext() if limit is None else mapped_above(limit)


def is_mapped(t: torch.Tensor) -> bool:
    """True when the tensor's bytes lie in a file mapping (torch.load(mmap=True),
    torch.from_file), read from the kernel's own list of this process's mappings:
    torch marks neither storage as file-backed."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    ptr = t.data_ptr()
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:  # start-end perms offset dev inode [path]
        fields = line.split()
        lo, hi = (int(a, 16) for a in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[4] != "0"  # inode 0: anonymous memory
    return False


def place(
    splits: FewShotSplits,
    limit: int | None,
    device: torch.device,
    scratch_dir: Path,
    names=("train", "val", "test"),
) -> dict[str, torch.Tensor]:
    """Each named split's images, in memory on `device` while they fit `limit` bytes (None:
    all), in order, else as a memory-mapped CPU tensor."""
    out = {}
    for name in names:
        t = splits.images[name]
        size = t.numel() * t.element_size()
        if limit is None or size <= limit:
            limit = None if limit is None else limit - size
            # a mapped tensor is read into RAM once, so no task waits on the disk
            out[name] = t.to(device) if device.type != "cpu" else t.clone() if is_mapped(t) else t
        else:
            out[name] = t if is_mapped(t) and t.is_contiguous() else to_file(t, scratch_dir)
    return out


def to_file(t: torch.Tensor, folder: Path) -> torch.Tensor:
    """`t` copied into a file in `folder` and mapped back; the file is unlinked at once, so
    its space returns when the run ends, however it ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = t.to("cpu").contiguous()
    fd, path = tempfile.mkstemp(prefix=".store.", suffix=".u8", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            flat = t.view(-1)
            step = 1 << 26  # 64 MB at a time: no second copy of the split in memory
            for i in range(0, flat.numel(), step):
                f.write(flat[i : i + step].numpy())  # the buffer itself, not a copy
        mapped = torch.from_file(path, shared=False, size=t.numel(), dtype=t.dtype)
    finally:
        os.unlink(path)
    return mapped.view(t.shape)
