"""ckptd's benchmark harness: every alternative and the hardware limits, side by side.

``python -m bench.run [--quick] [--out DIR]`` measures, in one run and on the same bytes, ckptd,
``torch.save``, ``safetensors``, ``save_pretrained``, ``torch.distributed.checkpoint.save`` and
``async_save`` against the memcpy floor and the disk's write+fsync limit. See bench/README.md.
"""
