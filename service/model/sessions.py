"""onnxruntime sessions on the chosen execution provider (CUDA when asked for and present)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ProviderUnavailable(Exception):
    """The execution provider asked for is not in this onnxruntime build."""


@dataclass(frozen=True)
class SessionFactory:
    """Builds onnxruntime sessions on the chosen execution provider."""

    providers: list[Any]
    intra_op_threads: int

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] == CUDA or (
            isinstance(self.providers[0], tuple) and self.providers[0][0] == CUDA
        )

    @classmethod
    def choose(cls, requested: str, intra_op_threads: int) -> SessionFactory:
        available = ort.get_available_providers()
        if requested == "cuda" and CUDA not in available:
            raise ProviderUnavailable(
                f"provider 'cuda' asked for, but this onnxruntime offers only {available}; "
                "install onnxruntime-gpu or use provider 'auto' or 'cpu'"
            )
        if requested in ("auto", "cuda") and CUDA in available:
            options = {
                "device_id": 0,
                # grow the memory arena by what is asked, not in powers of two
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC",
                "do_copy_in_default_stream": True,
            }
            return cls([(CUDA, options), CPU], 1)
        return cls([CPU], intra_op_threads)

    def session(self, path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1 if self.on_gpu else self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=self.providers)
