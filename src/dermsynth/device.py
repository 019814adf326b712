"""Host -> device copies that do not stall the GPU."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the GPU queue: a plain ``.to(cuda)`` from pageable memory waits for the stream
    to drain, so every step would idle the GPU while Python prepares the next batch; pinned + non_blocking does not."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
