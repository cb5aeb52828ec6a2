"""Options every calibrated method (GPTQ, AWQ) passes to :func:`~lightning_quant.calibration.run_sequential`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CalibrationOptions:
    """Base of the method configs (``GPTQConfig``, ``AWQConfig``): how the block runner is driven.

    Args:
        batch_size: rows per batch when the calibration data is one ``[N, T]`` tensor.
        block_path: dotted path of the decoder block list for models the finder misses.
        device: compute device for one block at a time (default: where the blocks are).
        progress: show a progress bar of blocks done.
    """

    batch_size: int = 8
    block_path: str | None = None
    device: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"{name}.batch_size={self.batch_size!r} must be an int >= 1.")
        if not isinstance(self.progress, bool):
            raise TypeError(f"{name}.progress must be True or False, got {self.progress!r}.")

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~lightning_quant.calibration.run_sequential`."""
        return {"block_path": self.block_path, "device": self.device, "progress": self.progress,
                "batch_size": self.batch_size}
