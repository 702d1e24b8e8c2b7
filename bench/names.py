"""Names shared by the harness's processes, importable without torch."""

from __future__ import annotations

SYSTEMS = ("ckptd", "torch_save", "safetensors", "save_pretrained", "dcp_save", "dcp_async")
WORKLOADS = ("qwen", "qwen_adamw", "small")
TRAIN_SYSTEMS = ("ckptd", "dcp_async", "torch_save")  # compared for training interference


def not_applicable(system: str, workload: str) -> str | None:
    """Why ``system`` cannot checkpoint ``workload``, or None if it can."""
    if system == "save_pretrained" and workload == "small":
        return "save_pretrained needs a PreTrainedModel; the small workload is a dict of tensors"
    return None
