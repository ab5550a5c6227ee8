"""Warm start (``train --init-from``): a new run's networks start from a trained model of
another source set, e.g. T1 -> FLAIR or T1+T2+T1c -> FLAIR from the T1+T2 model, so the
decoder, the style path and each shared source encoder do not relearn what the other
model already knows.

The weights are mapped source by source:
- a source both models take keeps its own shared encoder (SRE), its Cat-Conv input block,
  its LAF weight and its input channels of the discriminator (pix2pix: of the U-Net's
  first convolution);
- a source only the new model takes gets a copy of the encoder of ``t1`` (else of the
  first source), but a zero Cat-Conv block, LAF weight and input channels: the new run
  starts as exactly the old model's function and learns how much of the new source to use;
- a source only the old model takes is dropped with its blocks;
- every other weight (Cat-Conv's bias, the style path, the decoder, the rest of the
  discriminator) is copied as it is.
A 2D model can also start a 2.5D run (``--context-slices``): each source's slice keeps its
input weights, its new neighbouring slices get zero weights, so again the run starts as
the old model's function. The paper model's generator can also grow wider (``--width``;
``widen_generator``): every old channel keeps its weights, the new channels start with
fresh random inputs but zero weight into the old ones, so once more the run starts as the
old model's function and learns what to use the new channels for. The architecture, LAF
grid and style path must match, and the context and width can only grow. The optimiser
starts fresh. From a bundle, which holds only the generator, the discriminator starts
fresh; from a run folder or training checkpoint, both networks are taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from MRISynthesisLib.errors import InputError
from MRISynthesisLib.networks import ModelConfig

MATCHING_FIELDS = ("architecture", "laf_grid", "specific_encoder", "adain_scale", "image_size")
CHECKPOINT_NAME = "checkpoint.pt"
SRE_INPUT_WEIGHT = "model.0.0.weight"  # a shared encoder's first convolution, which takes the slices


class TrainedModel:
    """What a warm start reads: the generator (and discriminator, where kept) of a trained
    model with its source list and configuration."""

    def __init__(self, config: ModelConfig, sources: Sequence[str], G: dict, D: Optional[dict], origin: str):
        self.config, self.sources, self.G, self.D, self.origin = config, list(sources), G, D, origin


def load_trained_model(path) -> TrainedModel:
    """A bundle (.safetensors), a training checkpoint, or a run folder holding one."""
    from MRISynthesisLib.bundle import BundleError, load_bundle

    path = Path(path)
    origin = path.name  # the run folder's name, or the file's
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(f"no model bundle or training checkpoint at {path}")
    if path.suffix == ".safetensors":
        try:
            bundle = load_bundle(path)
        except BundleError as exc:
            raise InputError(str(exc)) from None
        return TrainedModel(bundle.model, bundle.sources, dict(bundle.state_dict), None, origin)
    from .trainer import model_config  # the trainer imports this module lazily

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a checkpoint"
        raise InputError(f"{path} is neither a model bundle nor a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != "mrisynthesis-training-checkpoint":
        raise InputError(f"{path} is not a training checkpoint of this package")
    cfg = state["config"]
    return TrainedModel(model_config(cfg), cfg["sources"].split(","), state["G"], state["D"], origin)


def source_map(new_sources: Sequence[str], old_sources: Sequence[str]) -> List[Optional[int]]:
    """For each new source, the index of the same source in the old model, or None."""
    return [old_sources.index(s) if s in old_sources else None for s in new_sources]


def remap_blocks(old: torch.Tensor, new_shape, dim: int, block: int, mapping: List[Optional[int]],
                 trailing: int = 0, old_block: Optional[int] = None) -> torch.Tensor:
    """``old`` with its per-source blocks of ``block`` entries along ``dim`` rearranged for
    the new sources (``mapping``: old index or None = zeros); ``trailing`` entries after the
    source blocks (the discriminator's target channel) are kept. Old blocks of
    ``old_block`` < ``block`` entries (fewer 2.5D neighbours) go in the middle of the new
    block, which is where a slice sits among its neighbours; the rest stays zero."""
    old_block = block if old_block is None else old_block
    offset = (block - old_block) // 2
    out = torch.zeros(new_shape, dtype=old.dtype)
    for new_i, old_i in enumerate(mapping):
        if old_i is not None:
            out.narrow(dim, new_i * block + offset, old_block).copy_(old.narrow(dim, old_i * old_block, old_block))
    if trailing:
        out.narrow(dim, len(mapping) * block, trailing).copy_(old.narrow(dim, old.shape[dim] - trailing, trailing))
    return out


def check_compatible(new: ModelConfig, old: ModelConfig) -> None:
    differ = [f"{f} {getattr(old, f)!r} (new run: {getattr(new, f)!r})" for f in MATCHING_FIELDS
              if getattr(new, f) != getattr(old, f)]
    if new.context_slices < old.context_slices:
        differ.append(f"context_slices {old.context_slices} (new run: {new.context_slices}; the context can only grow)")
    if new.base_width < old.base_width:
        differ.append(f"base_width {old.base_width} (new run: {new.base_width}; the width can only grow)")
    elif new.base_width > old.base_width and new.architecture != "fdgan":
        differ.append(f"base_width {old.base_width} (new run: {new.base_width}; only the paper model's "
                      "generator can grow wider)")
    if differ:
        raise InputError("the trained model differs from this run in " + ", ".join(differ))


def fitted(value: torch.Tensor, target: torch.Tensor, what: str) -> torch.Tensor:
    """``value`` in ``target``'s dtype, refused by name when its shape differs."""
    if tuple(value.shape) != tuple(target.shape):
        raise InputError(f"{what} has shape {tuple(value.shape)} in the trained model, "
                         f"this run needs {tuple(target.shape)}")
    return value.to(target.dtype)


def map_generator(new_state: Dict[str, torch.Tensor], old: TrainedModel, new_config: ModelConfig,
                  new_sources: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The new generator's state dict, mapped from ``old`` (module docstring)."""
    mapping = source_map(new_sources, old.sources)
    fallback = old.sources.index("t1") if "t1" in old.sources else 0
    per_source, old_per_source = new_config.slices_per_source, old.config.slices_per_source
    out = {}
    for key, target in new_state.items():
        encoder = re.match(r"shared_encoders\.(\d+)\.(.+)", key)
        if encoder:
            i = int(encoder.group(1))
            old_i = mapping[i] if mapping[i] is not None else fallback
            value = old.G[f"shared_encoders.{old_i}.{encoder.group(2)}"]
            if encoder.group(2) == SRE_INPUT_WEIGHT and per_source != old_per_source:
                value = remap_blocks(value, target.shape, 1, per_source, [0], old_block=old_per_source)
        elif key == "cat_conv.weight":
            value = remap_blocks(old.G[key], target.shape, 1, 4 * new_config.base_width, mapping)
        elif key == "laf.weight":
            value = remap_blocks(old.G[key], target.shape, 2, 1, mapping)
        elif key == "model.model.0.weight" and new_config.architecture == "pix2pix_unet":
            value = remap_blocks(old.G[key], target.shape, 1, per_source, mapping, old_block=old_per_source)
        else:
            value = old.G[key]
        out[key] = fitted(value, target, f"weight {key}")
    return out


def old_channel_positions(new_size: int, old_size: int, blocks: int = 1) -> torch.Tensor:
    """Where the old channels sit along a widened dimension: the leading entries of each of
    ``blocks`` equal blocks (a concatenation of per-source features, or the AdaIN scale and
    shift of each decoder layer, grows block by block)."""
    if new_size % blocks or old_size % blocks:
        raise ValueError(f"{old_size} -> {new_size} channels do not split into {blocks} blocks")
    step, keep = new_size // blocks, old_size // blocks
    return torch.cat([torch.arange(b * step, b * step + keep) for b in range(blocks)])


def widen_generator(G: torch.nn.Module, narrow_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict of the wider paper-model generator ``G`` holding a narrower one's
    weights (``narrow_state``, same sources and context): each old channel keeps its weights
    and biases; a new channel keeps ``G``'s fresh initialisation for its inputs, and its
    weight into every old channel is zero. Every layer acts per channel or through these
    weights (instance norm, AdaIN, ReLU, the residual sums), so the old channels compute
    exactly what they did and the output, which reads only old channels, is unchanged."""
    from torch import nn

    cfg = G.config
    # Dimensions that grow block by block: Cat-Conv's input (one block per source) and the
    # style MLP's output (scale and shift of every AdaIN layer, 4w channels each).
    blocks = {("cat_conv", 1): cfg.num_sources}
    if G.specific_encoder is not None:
        last = next(n for n, m in G.named_modules() if m is G.specific_encoder.mlp[-1])
        blocks[(last, 0)] = G.specific_encoder.mlp[-1].out_features // (4 * cfg.base_width)
    state = {k: v.detach().clone() for k, v in G.state_dict().items()}
    done = set()
    for name, module in G.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            continue
        out_dim, in_dim = (1, 0) if isinstance(module, nn.ConvTranspose2d) else (0, 1)
        weight, old_weight = state[f"{name}.weight"], narrow_state[f"{name}.weight"]
        out_pos = old_channel_positions(weight.shape[out_dim], old_weight.shape[out_dim],
                                        blocks.get((name, out_dim), 1))
        in_pos = old_channel_positions(weight.shape[in_dim], old_weight.shape[in_dim], blocks.get((name, in_dim), 1))
        rows = weight.index_select(out_dim, out_pos)
        rows.zero_()  # no weight from a new channel into an old one
        index = [slice(None)] * weight.dim()
        index[in_dim] = in_pos
        rows[tuple(index)] = old_weight.to(weight.dtype)
        weight.index_copy_(out_dim, out_pos, rows)
        done.add(f"{name}.weight")
        if module.bias is not None:
            state[f"{name}.bias"].index_copy_(0, out_pos, narrow_state[f"{name}.bias"].to(weight.dtype))
            done.add(f"{name}.bias")
    for key, value in state.items():  # what does not scale with the width (the LAF)
        if key not in done:
            state[key] = fitted(narrow_state[key], value, f"weight {key}")
    return state


def map_discriminator(new_state: Dict[str, torch.Tensor], old: TrainedModel, new_config: ModelConfig,
                      new_sources: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The new discriminator's state dict: its first convolution takes the sources' channels
    then the target's (``PatchDiscriminator``), remapped; the rest copied."""
    mapping = source_map(new_sources, old.sources)
    out = {}
    for key, target in new_state.items():
        if key == "model.0.weight":
            value = remap_blocks(old.D[key], target.shape, 1, new_config.slices_per_source, mapping, trailing=1,
                                 old_block=old.config.slices_per_source)
        else:
            value = old.D[key]
        out[key] = fitted(value, target, f"discriminator weight {key} (a different --d-width?)")
    return out


@contextlib.contextmanager
def named_after(option: str):
    """Errors of the block start with the option whose model they concern."""
    try:
        yield
    except InputError as exc:
        raise InputError(f"{option}: {exc}") from None


def warm_start(G: torch.nn.Module, D: torch.nn.Module, path, new_config: ModelConfig,
               new_sources: Sequence[str], discriminator_from=None) -> str:
    """Load the mapped weights into ``G`` (and ``D`` where the source holds one, or from
    ``discriminator_from``, a run folder or checkpoint); returns a one-line description for
    the log."""
    with named_after("--init-from"):
        old = load_trained_model(path)
        check_compatible(new_config, old.config)
        if new_config.base_width == old.config.base_width:
            G.load_state_dict(map_generator(G.state_dict(), old, new_config, new_sources))
        else:  # map the sources at the old width, then widen
            from MRISynthesisLib.networks import build_generator

            narrow_config = dataclasses.replace(new_config, base_width=old.config.base_width)
            narrow = map_generator(build_generator(narrow_config).state_dict(), old, narrow_config, new_sources)
            G.load_state_dict(widen_generator(G, narrow))
    kept = [s for s in new_sources if s in old.sources]
    added = [s for s in new_sources if s not in old.sources]
    dropped = [s for s in old.sources if s not in new_sources]
    parts = [f"warm start from {old.origin} ({'+'.join(old.sources)}): kept {','.join(kept) or 'no source'}"]
    if added:
        parts.append(f"added {','.join(added)} (encoder copied from "
                     f"{'t1' if 't1' in old.sources else old.sources[0]}, zero weight)")
    if dropped:
        parts.append(f"dropped {','.join(dropped)}")
    if new_config.base_width > old.config.base_width:
        parts.append(f"generator width {old.config.base_width} -> {new_config.base_width} "
                     "(new channels at zero weight into the old ones)")
    if new_config.context_slices > old.config.context_slices:
        parts.append(f"2.5D context {old.config.context_slices} -> {new_config.context_slices} slice(s) each side "
                     "(new neighbours at zero weight)")
    if discriminator_from is not None:
        # A bundle keeps no discriminator, and a fresh one against a trained generator let
        # fine-tunes blur (docs/learning_curves.md); another run's trained one is the alternative.
        with named_after("--init-discriminator-from"):
            other = load_trained_model(discriminator_from)
            if other.D is None:
                raise InputError(f"{discriminator_from} is a bundle, which holds no discriminator; "
                                 "give a run folder or training checkpoint")
            D.load_state_dict(map_discriminator(D.state_dict(), other, new_config, new_sources))
        parts.append(f"discriminator taken from {other.origin} ({'+'.join(other.sources)})")
    elif old.D is not None:
        with named_after("--init-from"):
            D.load_state_dict(map_discriminator(D.state_dict(), old, new_config, new_sources))
        parts.append("discriminator taken")
    else:
        parts.append("discriminator fresh (a bundle holds none)")
    return "; ".join(parts)
