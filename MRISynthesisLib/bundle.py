"""The model bundle: one file read by the command line, the Slicer module and evaluation.

Format: a safetensors file (tensors + a string-to-string header, never pickled code).
The header holds ``mrisynthesis_bundle`` = JSON with the format version, architecture
configuration, source and target modalities, preprocessing settings and training
provenance, and ``sha256`` = the SHA-256 of that JSON and every tensor (name, dtype,
shape, bytes), checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import BundleError
from .networks import ModelConfig, build_generator
from .preprocessing import PreprocessingConfig

FORMAT_NAME = "mrisynthesis-bundle"
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".safetensors"
MODALITIES = ("t1", "t2", "t1c", "flair")


@dataclass
class ModelBundle:
    model: ModelConfig
    sources: tuple
    target: str
    preprocessing: PreprocessingConfig
    state_dict: dict
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: Optional[str] = None
    sha256: Optional[str] = None

    def __post_init__(self):
        self.sources = tuple(self.sources)
        if len(self.sources) != self.model.num_sources:
            raise BundleError(f"bundle lists {len(self.sources)} sources {self.sources} but the model "
                              f"takes {self.model.num_sources}")
        for name in (*self.sources, self.target):
            if name not in MODALITIES:
                raise BundleError(f"unknown modality {name!r}; expected one of {MODALITIES}")

    def metadata(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "model": self.model.to_dict(),
            "sources": list(self.sources),
            "target": self.target,
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": self.provenance,
        }

    def build_generator(self, device="cpu") -> torch.nn.Module:
        """The generator with the bundle's weights, in eval mode, on ``device``."""
        net = build_generator(self.model)
        expected = net.state_dict()
        missing = sorted(set(expected) - set(self.state_dict))
        unexpected = sorted(set(self.state_dict) - set(expected))
        if missing or unexpected:
            raise BundleError(f"{self.path or 'bundle'}: weights do not match the architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for key, tensor in self.state_dict.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise BundleError(f"{self.path or 'bundle'}: weight {key} has shape {tuple(tensor.shape)}, "
                                  f"the architecture needs {tuple(expected[key].shape)}")
        net.load_state_dict({k: v.to(expected[k].dtype) for k, v in self.state_dict.items()})
        return net.to(device).eval()

    def describe(self) -> str:
        """Human-readable summary for ``mrisynthesis info``."""
        m, p = self.model, self.provenance
        lines = [
            f"bundle:        {self.path}",
            f"format:        {FORMAT_NAME} v{self.format_version}, sha256 {self.sha256}",
            f"task:          {' + '.join(self.sources)} -> {self.target}",
            f"inputs needed: {', '.join('--' + s for s in self.sources)}",
            f"architecture:  {m.architecture}, base width {m.base_width}"
            + (f", LAF grid {m.laf_grid}x{m.laf_grid}, specific encoder {'on' if m.specific_encoder else 'off'}"
               if m.architecture == "fdgan" else "")
            + (f", 2.5D input: {m.context_slices} neighbouring slice(s) on each side" if m.context_slices else ""),
            f"parameters:    {sum(t.numel() for t in self.state_dict.values()):,}",
            f"normalisation: {self.preprocessing.window_text()}; output scale 0-{self.preprocessing.output_max:g}",
            f"slice grid:    padded to a square of at least {self.preprocessing.min_field_of_view_mm:g} mm, "
            f"{self.preprocessing.resize_interpolation} onto {self.preprocessing.image_size}x"
            f"{self.preprocessing.image_size} where the size differs",
        ]
        # The held-out results as one line per method, brain figures first (whole-slice ones
        # mostly measure the background); the model card in full at the end.
        names = {"psnr_masked": "brain PSNR", "ssim_masked": "brain SSIM", "lesion_conspicuity": "lesion conspicuity",
                 "psnr": "PSNR", "ssim": "SSIM"}
        for method, stats in (p.get("held_out_evaluation") or {}).get("summary", {}).items():
            lines.append(f"held-out:      {method}: " + ", ".join(
                f"{names[k]} {stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}" for k in names if k in stats))
        for key in sorted(set(p) - {"model_card", "held_out_evaluation"}):
            value = p[key]
            text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
            lines.append(f"{key + ':':<15}{text if len(text) < 300 else text[:297] + '...'}")
        if p.get("model_card"):
            lines += ["", str(p["model_card"])]
        return "\n".join(lines)


def _digest(metadata_json: str, tensors: dict) -> str:
    h = hashlib.sha256(metadata_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_bundle(bundle: ModelBundle, path, half_precision: bool = False) -> str:
    """Write ``bundle`` to ``path`` atomically; returns the SHA-256. ``half_precision``
    stores floating-point weights as fp16 (half the size, loads back to fp32)."""
    from safetensors.torch import save

    tensors = {}
    for key, value in bundle.state_dict.items():
        t = value.detach().cpu().contiguous()
        if half_precision and t.is_floating_point():
            t = t.half()
        tensors[key] = t
    meta_json = json.dumps(bundle.metadata(), sort_keys=True)
    digest = _digest(meta_json, tensors)
    data = save(tensors, metadata={"mrisynthesis_bundle": meta_json, "sha256": digest})
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    bundle.path, bundle.sha256 = path, digest
    return digest


def load_bundle(path) -> ModelBundle:
    """Read and verify a bundle; every failure is a ``BundleError`` naming the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BundleError(f"model bundle not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise BundleError(f"{path}: not a model bundle (file is {len(data)} bytes)")
    header_len = struct.unpack("<Q", data[:8])[0]
    if header_len > len(data) - 8:
        if data[8:9] == b"{":
            raise BundleError(f"{path}: truncated model bundle (header says {header_len} bytes, file has {len(data)})")
        raise BundleError(f"{path}: not a model bundle (no safetensors header)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError:
        raise BundleError(f"{path}: not a model bundle (unreadable header)") from None
    meta = header.get("__metadata__") or {}
    if "mrisynthesis_bundle" not in meta:
        raise BundleError(f"{path}: a safetensors file but not an MRISynthesis model bundle (no bundle metadata)")
    payload_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + payload_end > len(data):
        raise BundleError(f"{path}: truncated model bundle ({len(data)} bytes, expected {8 + header_len + payload_end})")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise BundleError(f"{path}: corrupted model bundle: {exc}") from exc
    meta_json = meta["mrisynthesis_bundle"]
    digest = _digest(meta_json, tensors)
    if digest != meta.get("sha256"):
        raise BundleError(f"{path}: SHA-256 mismatch (stored {meta.get('sha256')}, computed {digest}); "
                          "the file is corrupted or was modified")
    info = json.loads(meta_json)
    if info.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: unknown bundle format {info.get('format')!r}")
    if info.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {info.get('format_version')} is not supported "
                          f"(this MRISynthesis reads version {FORMAT_VERSION}); update MRISynthesis")
    try:
        bundle = ModelBundle(
            model=ModelConfig.from_dict(info["model"]),
            sources=info["sources"],
            target=info["target"],
            preprocessing=PreprocessingConfig.from_dict(info["preprocessing"]),
            state_dict=tensors,
            provenance=info.get("provenance", {}),
            format_version=info["format_version"],
            path=path,
            sha256=digest,
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{path}: invalid bundle metadata: {exc}") from exc
    return bundle


def bundle_from_generator(generator: torch.nn.Module, config: ModelConfig, sources, target: str = "flair",
                          preprocessing: Optional[PreprocessingConfig] = None,
                          provenance: Optional[dict] = None) -> ModelBundle:
    """Wrap a trained (or freshly initialised) generator as a bundle."""
    state = {k: v.detach().cpu() for k, v in generator.state_dict().items()}
    return ModelBundle(model=config, sources=tuple(sources), target=target,
                       preprocessing=preprocessing or PreprocessingConfig(), state_dict=state,
                       provenance=dict(provenance or {}))
