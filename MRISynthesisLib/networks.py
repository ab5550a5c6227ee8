"""Networks of the feature-disentanglement GAN and its pix2pix baseline.

Everything here follows ``shared/reference/METHOD.md``; widths scale with
``ModelConfig.base_width`` (64 is the paper's value) so that smaller models can be
trained on a CPU without changing the structure.

Factories in the style of pix2pix's ``networks.py``: ``build_generator``,
``build_discriminator``, ``init_weights`` and ``norm_layer`` (chosen by name).
AdaIN parameters are sized from the decoder as MUNIT's ``get_num_adain_params`` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn
import torch.nn.functional as F

ARCHITECTURES = ("fdgan", "pix2pix_unet")
LAF_GRIDS = (1, 2, 4, 8, 16)
# How the SPE's MLP output becomes the AdaIN scale: "one_plus_delta" (std' = 1 + MLP
# output, so a fresh network starts as plain instance norm and the decoder passes
# gradient), or "direct" (std' = MLP output, the paper's literal form; with N(0, 0.02)
# init it starts near 0 and the decoder's residual blocks get no gradient).
ADAIN_SCALES = ("one_plus_delta", "direct")
# Initialisation of the SPE and its MLP: "kaiming" (He, fan-in, as MUNIT's generator:
# activations keep their scale through the 6 ReLU layers, so they learn from the first
# step) or "normal" (the paper's N(0, 0.02) everywhere: their gradients start below Adam's eps).
STYLE_INITS = ("kaiming", "normal")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a generator; stored in every model bundle."""

    architecture: str = "fdgan"
    num_sources: int = 2
    base_width: int = 64
    laf_grid: int = 2
    # False gives the shared-information-only ablation (MILR-like): no LAF/SPE/AdaIN.
    specific_encoder: bool = True
    num_res_blocks: int = 4
    style_dim: int = 8
    # Hidden width of the SPE's MLP; None means 4 * base_width (256 in the paper).
    mlp_dim: Optional[int] = None
    image_size: int = 256
    adain_scale: str = "one_plus_delta"
    # 2.5D input: this many neighbouring axial slices on each side of the slice to
    # synthesise go with each source as extra channels (0 = the paper's 2D input).
    context_slices: int = 0
    # pix2pix U-Net options (the paper's baseline uses batch norm and dropout).
    unet_norm: str = "batch"
    unet_dropout: bool = True

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.num_sources < 1:
            raise ValueError(f"num_sources must be >= 1, got {self.num_sources}")
        if self.base_width < 1:
            raise ValueError(f"base_width must be >= 1, got {self.base_width}")
        if self.laf_grid not in LAF_GRIDS:
            raise ValueError(f"laf_grid must be one of {LAF_GRIDS}, got {self.laf_grid}")
        if self.adain_scale not in ADAIN_SCALES:
            raise ValueError(f"adain_scale must be one of {ADAIN_SCALES}, got {self.adain_scale!r}")
        if self.context_slices < 0:
            raise ValueError(f"context_slices must be >= 0, got {self.context_slices}")
        if self.image_size % 16 != 0:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if self.architecture == "pix2pix_unet" and self.image_size != 256:
            raise ValueError("the pix2pix U-Net (8 downsamplings) needs image_size 256")

    @property
    def slices_per_source(self) -> int:
        return 2 * self.context_slices + 1

    @property
    def input_channels(self) -> int:
        """Channels of the network input: each source's slices (neighbours and centre,
        in axial order) one after another, source by source."""
        return self.num_sources * self.slices_per_source

    def centre_channels(self) -> list:
        """Input channels that hold the slice being synthesised, one per source."""
        return [i * self.slices_per_source + self.context_slices for i in range(self.num_sources)]

    @property
    def hidden_mlp_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.base_width

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model configuration keys: {sorted(unknown)}")
        # A stored configuration without the key predates it: its AdaIN scale was direct.
        values = {"adain_scale": "direct", **values}
        return cls(**values)


def check_input(sources: torch.Tensor, config: ModelConfig) -> None:
    if sources.dim() != 4 or sources.shape[1] != config.input_channels:
        raise ValueError(f"expected sources of shape (B, {config.input_channels}, H, W), got {tuple(sources.shape)}")


class GeneratorOutput(NamedTuple):
    synthetic: torch.Tensor
    # LAF pseudo-target; None for generators without one (pix2pix, shared-only ablation).
    pseudo_target: Optional[torch.Tensor]


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Instance norm without affine parameters, in either memory layout. On channels-last
    input F.instance_norm copies to channels-first and back (35% of the bf16 network's time
    on the CPU); group norm with one channel per group is the same normalisation and keeps
    the layout."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return F.group_norm(x, x.shape[1], eps=eps)
    return F.instance_norm(x, eps=eps)


class InstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d (no affine, no running stats; the same empty state) through
    ``instance_norm``, so channels-last activations stay channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.eps)


def norm_layer(name: str, num_features: int) -> nn.Module:
    """Normalisation layer chosen by name, as pix2pix's get_norm_layer."""
    if name == "batch":
        return nn.BatchNorm2d(num_features, affine=True, track_running_stats=True)
    if name == "instance":
        return InstanceNorm2d(num_features, affine=False, track_running_stats=False)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {name!r}; expected batch, instance or none")


# --------------------------------------------------------------------------- AdaIN


class AdaptiveInstanceNorm2d(nn.Module):
    """AdaIN(x) = std' * (x - mu(x)) / sigma(x) + mean'; std'/mean' are set per sample
    by ``assign_adain_params`` before each forward pass (MUNIT's convention).
    ``scale_offset`` is added to the assigned std' (1 for the "one_plus_delta" form)."""

    def __init__(self, num_features: int, eps: float = 1e-5, scale_offset: float = 0.0):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.scale_offset = scale_offset
        self.weight: Optional[torch.Tensor] = None  # std', shape (B, C)
        self.bias: Optional[torch.Tensor] = None  # mean', shape (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None:
            raise RuntimeError("AdaIN parameters were not assigned before the forward pass")
        normalized = instance_norm(x, self.eps)
        scale = self.weight + self.scale_offset if self.scale_offset else self.weight
        return normalized * scale[:, :, None, None] + self.bias[:, :, None, None]


def get_num_adain_params(model: nn.Module) -> int:
    """Number of values the SPE's MLP must produce for ``model`` (mean and std per channel)."""
    return sum(2 * m.num_features for m in model.modules() if isinstance(m, AdaptiveInstanceNorm2d))


def assign_adain_params(adain_params: torch.Tensor, model: nn.Module) -> None:
    """Hand each AdaIN layer of ``model`` its slice of ``adain_params`` (B, N)."""
    offset = 0
    for m in model.modules():
        if isinstance(m, AdaptiveInstanceNorm2d):
            c = m.num_features
            m.bias = adain_params[:, offset : offset + c]
            m.weight = adain_params[:, offset + c : offset + 2 * c]
            offset += 2 * c
    if offset != adain_params.shape[1]:
        raise RuntimeError(f"AdaIN parameter count mismatch: model needs {offset}, got {adain_params.shape[1]}")


# --------------------------------------------------------------------------- blocks


def conv_norm_relu(in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, padding), norm_layer(norm, out_ch), nn.ReLU(True))


class ResidualBlock(nn.Module):
    """pad-Conv3x3-norm-ReLU-pad-Conv3x3-norm with an identity skip; norm "adain" uses AdaIN."""

    def __init__(self, channels: int, norm: str = "instance", adain_scale_offset: float = 0.0):
        super().__init__()

        def make_norm():
            if norm == "adain":
                return AdaptiveInstanceNorm2d(channels, scale_offset=adain_scale_offset)
            return norm_layer(norm, channels)

        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), make_norm(), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), make_norm(),
        )

    def forward(self, x):
        return x + self.block(x)


class SharedEncoder(nn.Module):
    """SRE: one source's slice (and its neighbours, 2.5D) -> (4w, H/4, W/4) content features."""

    def __init__(self, width: int, num_res_blocks: int, in_channels: int = 1):
        super().__init__()
        self.model = nn.Sequential(
            conv_norm_relu(in_channels, width, 7, 1, 3, "instance"),
            conv_norm_relu(width, 2 * width, 4, 2, 1, "instance"),
            conv_norm_relu(2 * width, 4 * width, 4, 2, 1, "instance"),
            *[ResidualBlock(4 * width, "instance") for _ in range(num_res_blocks)],
        )

    def forward(self, x):
        return self.model(x)


class LocalAdaptiveFusion(nn.Module):
    """LAF: a g x g grid of blocks, each block position with its own 1x1 conv (M -> 1)."""

    def __init__(self, num_sources: int, grid: int):
        super().__init__()
        self.grid = grid
        # Start from the average of the sources so the pseudo-target carries signal from
        # the first iteration; the N(0, 0.02) spread matches the rest of the network.
        self.weight = nn.Parameter(torch.full((grid, grid, num_sources), 1.0 / num_sources)
                                   + 0.02 * torch.randn(grid, grid, num_sources))
        self.bias = nn.Parameter(torch.zeros(grid, grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m, h, w = x.shape
        g = self.grid
        if h % g or w % g:
            raise ValueError(f"slice size {h}x{w} is not divisible by the LAF grid {g}")
        blocks = x.reshape(b, m, g, h // g, g, w // g)
        fused = torch.einsum("bmiyjx,ijm->biyjx", blocks, self.weight.to(x.dtype))
        fused = fused + self.bias.to(x.dtype)[None, :, None, :, None]
        return fused.reshape(b, 1, h, w)


class SpecificEncoder(nn.Module):
    """SPE: pseudo-target -> style code (style_dim) -> MLP -> AdaIN parameters."""

    def __init__(self, width: int, style_dim: int, mlp_dim: int, num_adain_params: int):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 4 * width, 4 * width]
        layers = [nn.Conv2d(1, width, 7, 1, 3), nn.ReLU(True)]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.ReLU(True)]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(4 * width, style_dim, 1)]
        self.encoder = nn.Sequential(*layers)
        self.mlp = nn.Sequential(
            nn.Linear(style_dim, mlp_dim), nn.ReLU(True),
            nn.Linear(mlp_dim, mlp_dim), nn.ReLU(True),
            nn.Linear(mlp_dim, num_adain_params),
        )

    def forward(self, pseudo_target):
        style = self.encoder(pseudo_target).flatten(1)
        return self.mlp(style)


class Decoder(nn.Module):
    """Residual blocks (AdaIN, or IN for the shared-only ablation) and upsampling to an image."""

    def __init__(self, width: int, num_res_blocks: int, norm: str, adain_scale_offset: float = 0.0):
        super().__init__()
        self.model = nn.Sequential(
            *[ResidualBlock(4 * width, norm, adain_scale_offset) for _ in range(num_res_blocks)],
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.ReLU(True),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(True),
            # The paper's third ConvT block: stride 1, maps to the image.
            nn.ConvTranspose2d(width, 1, 7, 1, 3), nn.Tanh(),
        )

    def forward(self, x):
        return self.model(x)


class FeatureDisentanglementGenerator(nn.Module):
    """The paper's generator: per-source SREs, Cat-Conv, LAF -> SPE -> AdaIN decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        w, m = config.base_width, config.num_sources
        self.shared_encoders = nn.ModuleList(SharedEncoder(w, config.num_res_blocks, config.slices_per_source)
                                             for _ in range(m))
        self.cat_conv = nn.Conv2d(4 * w * m, 4 * w, 3, 1, 1)
        if config.specific_encoder:
            offset = 1.0 if config.adain_scale == "one_plus_delta" else 0.0
            self.decoder = Decoder(w, config.num_res_blocks, "adain", offset)
            self.laf = LocalAdaptiveFusion(m, config.laf_grid)
            self.specific_encoder = SpecificEncoder(w, config.style_dim, config.hidden_mlp_dim,
                                                    get_num_adain_params(self.decoder))
        else:
            self.decoder = Decoder(w, config.num_res_blocks, "instance")
            self.laf = None
            self.specific_encoder = None

    def forward(self, sources: torch.Tensor) -> GeneratorOutput:
        """sources: (B, input_channels, H, W) in [-1, 1] (M channels for 2D input) ->
        synthetic target and pseudo-target (B, 1, H, W)."""
        check_input(sources, self.config)
        content = self.encode_content(sources)
        if self.specific_encoder is None:
            return GeneratorOutput(self.decoder(content), None)
        style, pseudo = self.encode_style(sources)
        return GeneratorOutput(self.decode(content, style), pseudo)

    def encode_content(self, sources: torch.Tensor) -> torch.Tensor:
        """Shared information: per-source SREs fused by Cat-Conv, (B, 4w, H/4, W/4)."""
        n = self.config.slices_per_source
        content = torch.cat([enc(sources[:, i * n : (i + 1) * n]) for i, enc in enumerate(self.shared_encoders)], dim=1)
        return self.cat_conv(content)

    def encode_style(self, sources: torch.Tensor):
        """Specific information: the LAF pseudo-target and the AdaIN parameters the SPE
        derives from it, (B, num_adain_params)."""
        if self.config.context_slices:
            sources = sources[:, self.config.centre_channels()]  # the pseudo-target is of the slice itself
        pseudo = self.laf(sources)
        return self.specific_encoder(pseudo), pseudo

    def decode(self, content: torch.Tensor, style: Optional[torch.Tensor]) -> torch.Tensor:
        """The synthetic target from content features and AdaIN parameters (None for the
        shared-only ablation)."""
        if style is not None:
            assign_adain_params(style, self.decoder)
        return self.decoder(content)


class UnetSkipBlock(nn.Module):
    """pix2pix's UnetSkipConnectionBlock: down - submodule - up, with a skip concatenation."""

    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False,
                 innermost=False, norm="batch", use_dropout=False):
        super().__init__()
        self.outermost = outermost
        use_bias = norm != "batch"
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, 2, 1, bias=use_bias)
        downrelu, uprelu = nn.LeakyReLU(0.2, True), nn.ReLU(True)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, 2, 1, bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, norm_layer(norm, outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=use_bias)
            model = [downrelu, downconv, norm_layer(norm, inner_nc), submodule,
                     uprelu, upconv, norm_layer(norm, outer_nc)]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix ``unet_256`` with the M sources stacked as input channels."""

    def __init__(self, config: ModelConfig, num_downs: int = 8):
        super().__init__()
        self.config = config
        ngf, norm, drop = config.base_width, config.unet_norm, config.unet_dropout
        block = UnetSkipBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            block = UnetSkipBlock(ngf * 8, ngf * 8, submodule=block, norm=norm, use_dropout=drop)
        block = UnetSkipBlock(ngf * 4, ngf * 8, submodule=block, norm=norm)
        block = UnetSkipBlock(ngf * 2, ngf * 4, submodule=block, norm=norm)
        block = UnetSkipBlock(ngf, ngf * 2, submodule=block, norm=norm)
        self.model = UnetSkipBlock(1, ngf, input_nc=config.input_channels, submodule=block, outermost=True, norm=norm)

    def forward(self, sources: torch.Tensor) -> GeneratorOutput:
        check_input(sources, self.config)
        return GeneratorOutput(self.model(sources), None)


class PatchDiscriminator(nn.Module):
    """Conditional 70x70 PatchGAN: (input channels + target) -> patch logits; 64-128-256-512-1."""

    def __init__(self, input_channels: int, width: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        use_bias = norm != "batch"
        layers = [nn.Conv2d(input_channels + 1, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=use_bias),
                       norm_layer(norm, width * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, sources: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits (no sigmoid): train with BCEWithLogitsLoss, the numerically safe sigmoid/BCE."""
        return self.model(torch.cat([sources, target], dim=1))

    def forward_with_features(self, sources: torch.Tensor, target: torch.Tensor):
        """Logits and the activation after each LeakyReLU (the features pix2pixHD's
        feature-matching loss compares)."""
        features = []
        x = torch.cat([sources, target], dim=1)
        for layer in self.model:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                features.append(x)
        return x, features


# --------------------------------------------------------------------------- factories


def build_generator(config: ModelConfig) -> nn.Module:
    if config.architecture == "fdgan":
        return FeatureDisentanglementGenerator(config)
    return UnetGenerator(config)


def build_discriminator(input_channels: int, width: int = 64, norm: str = "batch") -> PatchDiscriminator:
    """input_channels: the generator's (ModelConfig.input_channels: the sources, 2.5D neighbours included)."""
    return PatchDiscriminator(input_channels, width, norm=norm)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """pix2pix's "normal" init: conv/linear weights N(0, gain), biases 0, BN weights N(1, gain)."""

    def init_fn(m):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)

    return net.apply(init_fn)


def init_generator(net: nn.Module, style_init: str = "kaiming", gain: float = 0.02) -> nn.Module:
    """The one initialisation of a generator for training: pix2pix's N(0, gain) (the paper's
    init), then, for ``style_init="kaiming"``, He init of the SPE and its MLP (MUNIT's
    choice) with the MLP's last layer scaled down so the AdaIN parameters start small but
    alive (with "one_plus_delta", std' starts near 1 and mean' near 0)."""
    if style_init not in STYLE_INITS:
        raise ValueError(f"style_init must be one of {STYLE_INITS}, got {style_init!r}")
    init_weights(net, gain)
    spe = getattr(net, "specific_encoder", None)
    if style_init == "kaiming" and spe is not None:
        for m in spe.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0.0, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        last = spe.mlp[-1]
        with torch.no_grad():
            last.weight.mul_(0.1)  # AdaIN deltas of about 0.1 at the start: alive, not disruptive
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
