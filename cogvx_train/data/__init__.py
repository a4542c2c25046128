"""The data path: recipe -> manifest -> dataset -> batch.

- ``manifest``: the versioned, decode-checked manifest (``build_manifest``, ``read_manifest``, ``summarize``).
- ``synthetic``: the seeded coloured-shapes dataset (``generate_synthetic_dataset``, ``ensure_default_dataset``)
  and index clips for tests (``write_index_clip``, ``decode_frame_index``).
- ``video_io``: true-fps frame indices, decoding only those frames, cover resize + centre crop.
- ``frame_pack``: ``FramePackDataset``, ``BucketBatchSampler``, ``FramePackDataModule``, ``DataPositionCallback``.

Names are imported on first use (PEP 562), so ``import cogvx_train.data`` pulls in neither torch, Lightning,
decord nor PyAV.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "manifest": ("Manifest", "ManifestEntry", "MANIFEST_SCHEMA", "MANIFEST_VERSION", "build_manifest",
                 "read_manifest", "write_manifest", "summarize", "format_summary", "probe_file",
                 "load_captions_file", "summary_paths"),
    "synthetic": ("generate_synthetic_dataset", "ensure_default_dataset", "default_cache_dir", "write_index_clip",
                  "decode_frame_index", "write_mp4"),
    "video_io": ("FrameSelection", "sample_frame_indices", "choose_start_index", "max_start_index", "read_frames",
                 "read_image", "resize_cover_center_crop", "load_clip", "decode_size", "cover_size",
                 "VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS"),
    "frame_pack": ("FramePackDataset", "BucketBatchSampler", "FramePackDataModule", "DataPositionCallback",
                   "DataPosition", "Bucket", "collate_frame_pack", "check_num_frames", "check_resolution",
                   "check_resolutions", "check_batch_size", "check_target_fps", "check_fraction"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
