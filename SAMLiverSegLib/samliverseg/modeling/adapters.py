"""Med-SA adapters: parameter-efficient fine-tuning of a frozen SAM / LiteMedSAM.

Following the Medical SAM Adapter idea (design digest section 2), the base model stays frozen
and small trainable modules are inserted into it. Everything here is written for this
repository's own modules (``image_encoder.py``, ``tiny_vit.py``, ``transformer.py``).

Bottleneck adapter
------------------
``A(x) = W_up · GELU(W_down · x + b_down) + b_up`` with ``W_down: C -> r``, ``W_up: r -> C``.
``W_up`` and ``b_up`` are initialised to **zero**, so every adapter starts as the zero map and
an adapted model computes exactly what the base model computes until it is trained. The width
is ``r = max(1, round(C · bottleneck_ratio))`` (or ``bottleneck`` when given); the default ratio
1/16 makes the encoder adapters about 2 % of the encoder's parameters (1.995 % for SAM ViT-B,
1.78 % for LiteMedSAM's TinyViT; see ``count_parameters``).

Where the adapters go (every transformer block of the image encoder)
--------------------------------------------------------------------
SAM ViT block (``image_encoder.Block``; ViT-B/L/H and any configuration), input ``x`` (N, H, W, C)::

    h  = norm1(x)
    a  = Attn(h)                          # windowed or global, as in the base block
    a  = a + A_space(a)                   # serial adapter on the attention output
    a  = a + A_depth(Attn_depth(h))       # SD-Trans only (below)
    x  = x + a
    h2 = norm2(x)
    y  = x + MLP(h2) + s · A_mlp(h2)      # parallel adapter beside the MLP (s = mlp_scale)

TinyViT block (``tiny_vit.TinyViTBlock``: LiteMedSAM's attention stages 2-4; the MBConv stage
has no attention and gets no adapter), tokens ``x`` (N, L, C)::

    a = WinAttn(x)                        # the block's windowed attention (LayerNorm inside)
    a = a + A_space(a);  a = a + A_depth(Attn_depth(x))   # the latter with SD-Trans
    x = x + a;  x = LocalConv(x)
    y = x + MLP(x) + s · A_mlp(MLP.norm(x))

SD-Trans (space-depth transpose)
--------------------------------
For 3D input, a slab of D consecutive slices goes through the 2D encoder as a batch of D images
(batch index = slab · D + slice). In each adapted block the normalised tokens ``h`` (N, H, W, C)
are transposed to (N/D · H · W, D, C): for every spatial position the D slices form a sequence,
and the block's **own frozen attention weights** (qkv, proj) attend over it. Position along depth
uses the attention's frozen relative-position table of the vertical axis: ViT adds ``q · R_h(dz)``
(the central 2D-1 rows of ``rel_pos_h``: slices are treated like vertically adjacent tokens;
interpolated when D exceeds the table); TinyViT uses its learned per-offset bias at vertical
offset ``|dz|`` (clamped to the window side - 1). The result goes through the depth adapter and is
transposed back. The depth branch contributes **only through A_depth**, which is zero at
initialisation: an untrained SD-Trans model gives exactly the 2D result.

Slab rule: a batch of N images is N/D slabs of D when N is a multiple of D; a batch of fewer
than D images is one slab of N (so a single slice, as the slice-by-slice engine embeds it, is a
slab of depth 1 and gets no inter-slice context); any other N is an error. Both the ViT and the
TinyViT encoders support SD-Trans. ``set_slab_depth(model, D)`` changes D at run time.

HyP-Adpt (hyper-prompting adapter, mask decoder)
------------------------------------------------
The decoder's two-way transformer gets two prompt-conditioned adapters: one on the image
embedding that enters it and one on the image tokens it returns (before the upscaling). For one
prompt, with ``p`` = the mean of its sparse prompt tokens (box corners / points, as the prompt
encoder gives them; zero when there are none) and image tokens ``x`` (HW, C)::

    [vec(W_p) ; β_p] = H · LN(p) + h            # hyper-network: C -> r·r + r
    W_p = reshape(vec(W_p), r, r) / sqrt(r)
    e   = GELU(x · W_d + b_d)                   # (HW, r)
    HyP(x, p) = GELU(e · W_p + β_p) · W_u + b_u # (HW, C); W_u, b_u = 0 at init
    x  <- x + HyP(x, p)

so the adapter's middle weights are generated from the prompt (r = ``hyp_rank``).

Parameter names
---------------
The base modules keep their class-defined parameter names; an adapted block is the same object
with its class switched to an adapted subclass and the adapters added as children named
``adapter_space``, ``adapter_mlp``, ``adapter_depth``, ``adapter_hyp_in``, ``adapter_hyp_out``.
So a base ``state_dict`` still loads strictly into the base part, and :func:`adapter_state`
returns the adapter keys (every key with a component starting with ``adapter_``).

Saved adapter models (``model.pth`` of trainer kind ``adapter``)
------------------------------------------------------------------
``{"model": {adapter keys (+ trained base parts, e.g. mask_decoder.*)}, "metadata": {"kind":
"adapter", "base_model": <registry name>, "base_checkpoint": <path>, "base_checkpoint_sha256":
<hex>, "adapter": <AdapterConfig dict>, "trained_prefixes": [...], "window": ..., ...}}``.
Writing and reading those files is not done here (this module holds only modules and pure
functions on them): ``samliverseg.models.adapters`` has ``save_adapted_model`` and
``load_adapted_model`` (builds the base by name, checks the base weights' SHA-256, inserts the
adapters and loads the adapter weights strictly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from samliverseg.core.errors import InputError
from samliverseg.modeling.image_encoder import Block as ViTBlock
from samliverseg.modeling.image_encoder import relative_position_table, window_partition, window_unpartition
from samliverseg.modeling.tiny_vit import TinyViTBlock
from samliverseg.modeling.transformer import TwoWayTransformer

ADAPTER_KIND = "adapter"
ADAPTER_PREFIX = "adapter_"


# ---------------------------------------------------------------------------------- config
@dataclass
class AdapterConfig:
    """Where and how wide the adapters are (the ``adapter:`` section of a training config)."""

    bottleneck_ratio: float = 0.0625  # r = max(1, round(C * ratio)) per block width C
    bottleneck: Optional[int] = None  # a fixed width r for every encoder adapter (overrides the ratio)
    mlp_adapter: bool = True  # the parallel adapter beside each block's MLP
    mlp_scale: float = 0.5  # s: the MLP adapter's output scale
    sd_trans: bool = False  # SD-Trans: attention along depth over slabs of `depth` slices
    depth: int = 3  # D, the slab depth (used with sd_trans)
    hyp: bool = True  # HyP-Adpt in the mask decoder
    hyp_rank: int = 8  # r of the HyP adapters

    def validate(self, section: str = "adapter") -> None:
        if not (0.0 < self.bottleneck_ratio <= 4.0):
            raise InputError(f"{section}.bottleneck_ratio must be in (0, 4], got {self.bottleneck_ratio}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise InputError(f"{section}.bottleneck must be at least 1 (or null), got {self.bottleneck}")
        if self.mlp_scale < 0:
            raise InputError(f"{section}.mlp_scale must not be negative, got {self.mlp_scale}")
        if self.depth < 1 or self.depth > 64:
            raise InputError(f"{section}.depth must be between 1 and 64 slices, got {self.depth}")
        if self.hyp_rank < 1 or self.hyp_rank > 64:
            raise InputError(f"{section}.hyp_rank must be between 1 and 64, got {self.hyp_rank}")

    def width(self, dim: int) -> int:
        return int(self.bottleneck) if self.bottleneck else max(1, int(round(dim * self.bottleneck_ratio)))

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(AdapterConfig)}

    @classmethod
    def from_any(cls, config: Union["AdapterConfig", Mapping[str, Any], None]) -> "AdapterConfig":
        """An AdapterConfig from a config, a dict (unknown keys rejected) or None (defaults)."""
        if config is None:
            cfg = cls()
        elif isinstance(config, AdapterConfig):
            cfg = cls(**{f.name: getattr(config, f.name) for f in fields(AdapterConfig)})
        elif isinstance(config, Mapping):
            known = {f.name for f in fields(AdapterConfig)}
            unknown = [k for k in config if k not in known]
            if unknown:
                raise InputError(f"unknown adapter option {unknown[0]!r} (known: {', '.join(sorted(known))})")
            cfg = cls(**dict(config))
        else:
            raise TypeError(f"expected an AdapterConfig or a mapping, got {type(config).__name__}")
        cfg.validate()
        return cfg


# ---------------------------------------------------------------------------------- modules
class BottleneckAdapter(nn.Module):
    """``A(x) = up(GELU(down(x)))`` on the last axis; ``up`` is zero-initialised (A = 0 at start)."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class HyperPromptAdapter(nn.Module):
    """HyP-Adpt: a bottleneck adapter whose middle r x r weights come from the prompt (module docstring)."""

    def __init__(self, dim: int, prompt_dim: int, rank: int, device=None, dtype=None) -> None:
        super().__init__()
        self.rank = int(rank)
        self.down = nn.Linear(dim, rank, device=device, dtype=dtype)
        self.prompt_norm = nn.LayerNorm(prompt_dim, device=device, dtype=dtype)
        self.hyper = nn.Linear(prompt_dim, rank * rank + rank, device=device, dtype=dtype)
        self.up = nn.Linear(rank, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def prompt_weights(self, prompt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, P) prompt vectors -> W_p (B, r, r) and β_p (B, r)."""
        r = self.rank
        hw = self.hyper(self.prompt_norm(prompt))
        return hw[:, : r * r].reshape(-1, r, r) / math.sqrt(r), hw[:, r * r:]

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) image tokens, prompt (B, P) -> the adapter output (B, N, C) (add it to x)."""
        w, beta = self.prompt_weights(prompt.to(x.dtype))
        e = F.gelu(self.down(x))
        e = F.gelu(torch.bmm(e, w.to(e.dtype)) + beta[:, None, :].to(e.dtype))
        return self.up(e)


def _slab_depth(n: int, depth: int) -> int:
    """The slab depth used for a batch of n images (the slab rule of the module docstring)."""
    if n % depth == 0:
        return depth
    if n < depth:
        return n
    raise ValueError(f"an SD-Trans encoder takes slabs of {depth} slices: a batch of {n} images is not "
                     f"a multiple of {depth} (nor a single partial slab)")


def _to_depth_sequences(x: torch.Tensor, d: int) -> Tuple[torch.Tensor, torch.Size]:
    """(N, *S, C) with N = n_slabs * d -> (n_slabs * prod(S), d, C)."""
    n, c = x.shape[0], x.shape[-1]
    spatial = x.shape[1:-1]
    x = x.reshape(n // d, d, -1, c).transpose(1, 2)
    return x.reshape(-1, d, c), spatial


def _from_depth_sequences(t: torch.Tensor, n: int, d: int, spatial) -> torch.Tensor:
    c = t.shape[-1]
    t = t.reshape(n // d, -1, d, c).transpose(1, 2)
    return t.reshape(n, *spatial, c)


def vit_depth_attention(attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The frozen ViT ``Attention`` applied along depth: t (M, D, C) normalised tokens -> (M, D, C)."""
    m, d, c = t.shape
    heads, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(t).reshape(m, d, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if getattr(attn, "use_rel_pos", False):
        table = attn.rel_pos_h  # (2L - 1, hd): vertical offsets -(L-1)..(L-1)
        half = (table.shape[0] + 1) // 2
        if d <= half:
            table = table[half - d: half + d - 1]  # offsets -(D-1)..(D-1), no resampling
        rel = relative_position_table(d, d, table).to(q.dtype)  # (D, D, hd)
        bias = torch.einsum("bnqc,qkc->bnqk", q, rel)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return attn.proj(out.transpose(1, 2).reshape(m, d, c))


def tiny_depth_attention(attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The frozen TinyViT window ``Attention`` applied along depth: t (M, D, C) tokens -> (M, D, C)."""
    m, d, _ = t.shape
    x = attn.norm(t)
    q, k, v = attn.qkv(x).view(m, d, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=3)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))
    side = max(1, int(round(math.sqrt(attn.attention_biases.shape[1]))))  # the square window's side
    z = torch.arange(d, device=t.device)
    index = (z[:, None] - z[None, :]).abs().clamp(max=side - 1) * side  # offset (|dz|, 0) in the window
    bias = attn.attention_biases[:, index].to(q.dtype)  # (heads, D, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(m, d, attn.dh))


class AdaptedViTBlock(ViTBlock):
    """A SAM ViT ``Block`` with Med-SA adapters (set up by :func:`apply_adapters`, not constructed)."""

    adapter_space: nn.Module
    adapter_mlp: Optional[nn.Module]
    adapter_depth: Optional[nn.Module]
    adapter_scale: float
    sd_depth: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        h = self.norm1(x)
        if self.window_size > 0:
            hw = (h.shape[1], h.shape[2])
            windows, padded_hw = window_partition(h, self.window_size)
            a = window_unpartition(self.attn(windows), self.window_size, padded_hw, hw)
        else:
            a = self.attn(h)
        a = a + self.adapter_space(a)
        if self.adapter_depth is not None:
            n = h.shape[0]
            d = _slab_depth(n, self.sd_depth)
            seq, spatial = _to_depth_sequences(h, d)
            depth_out = self.adapter_depth(vit_depth_attention(self.attn, seq))
            a = a + _from_depth_sequences(depth_out, n, d, spatial)
        x = shortcut + a
        h2 = self.norm2(x)
        y = x + self.mlp(h2)
        if self.adapter_mlp is not None:
            y = y + self.adapter_scale * self.adapter_mlp(h2)
        return y


class AdaptedTinyViTBlock(TinyViTBlock):
    """A TinyViT block with Med-SA adapters (set up by :func:`apply_adapters`, not constructed)."""

    adapter_space: nn.Module
    adapter_mlp: Optional[nn.Module]
    adapter_depth: Optional[nn.Module]
    adapter_scale: float
    sd_depth: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"TinyViT block expects {h}x{w} tokens, got {n}")
        a = self._window_attention(x)
        a = a + self.adapter_space(a)
        if self.adapter_depth is not None:
            d = _slab_depth(b, self.sd_depth)
            seq, spatial = _to_depth_sequences(x, d)
            depth_out = self.adapter_depth(tiny_depth_attention(self.attn, seq))
            a = a + _from_depth_sequences(depth_out, b, d, spatial)
        x = x + self.drop_path(a)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).reshape(b, c, n).transpose(1, 2)
        y = x + self.drop_path(self.mlp(x))
        if self.adapter_mlp is not None:
            y = y + self.adapter_scale * self.adapter_mlp(self.mlp.norm(x))
        return y


class AdaptedTwoWayTransformer(TwoWayTransformer):
    """The decoder's two-way transformer with HyP-Adpt on its image tokens (in and out)."""

    adapter_hyp_in: HyperPromptAdapter
    adapter_hyp_out: HyperPromptAdapter
    n_output_tokens: int

    def prompt_vector(self, point_embedding: torch.Tensor) -> torch.Tensor:
        """p: the mean of the sparse prompt tokens (after the decoder's output tokens); zero if none."""
        sparse = point_embedding[:, self.n_output_tokens:]
        if sparse.shape[1] == 0:
            return point_embedding.new_zeros(point_embedding.shape[0], point_embedding.shape[2])
        return sparse.mean(dim=1)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor):
        p = self.prompt_vector(point_embedding)
        b, c, hh, ww = image_embedding.shape
        tokens = image_embedding.flatten(2).transpose(1, 2)
        tokens = tokens + self.adapter_hyp_in(tokens, p)
        image_embedding = tokens.transpose(1, 2).reshape(b, c, hh, ww)
        queries, keys = super().forward(image_embedding, image_pe, point_embedding)
        return queries, keys + self.adapter_hyp_out(keys, p)


# ---------------------------------------------------------------------------------- insertion
def _factory(module: nn.Module) -> Dict[str, Any]:
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


def _adapt_block(block: nn.Module, cls: type, dim: int, cfg: AdapterConfig) -> None:
    kw = _factory(block)
    r = cfg.width(dim)
    block.__class__ = cls
    block.adapter_space = BottleneckAdapter(dim, r, **kw)
    block.adapter_mlp = BottleneckAdapter(dim, r, **kw) if cfg.mlp_adapter else None
    block.adapter_depth = BottleneckAdapter(dim, r, **kw) if cfg.sd_trans else None
    block.adapter_scale = float(cfg.mlp_scale)
    block.sd_depth = int(cfg.depth)


def is_adapter_key(name: str) -> bool:
    """True for a parameter/state key that belongs to an adapter (a component ``adapter_*``)."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))


def apply_adapters(model: nn.Module, config: Union[AdapterConfig, Mapping[str, Any], None] = None,
                   freeze: bool = True) -> nn.Module:
    """Insert Med-SA adapters into ``model`` (a SamModel) in place and return it.

    Every ViT ``Block`` / TinyViT attention block of ``model.image_encoder`` gets the encoder
    adapters, the decoder's two-way transformer the HyP adapters (``hyp``). With ``freeze`` every
    base parameter gets ``requires_grad=False`` and every adapter parameter ``True``. The model's
    state dict keeps all base keys; ``model.adapter_config`` holds the config's dict.
    """
    cfg = AdapterConfig.from_any(config)
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError("this model already has adapters")
    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        raise InputError("apply_adapters needs a SAM-style model with an image_encoder")
    n_blocks = 0
    for module in list(encoder.modules()):
        if type(module) is ViTBlock:
            _adapt_block(module, AdaptedViTBlock, module.norm1.normalized_shape[0], cfg)
            n_blocks += 1
        elif type(module) is TinyViTBlock:
            _adapt_block(module, AdaptedTinyViTBlock, module.dim, cfg)
            n_blocks += 1
    if n_blocks == 0:
        raise InputError(f"no ViT or TinyViT transformer block found in the image encoder "
                         f"({type(encoder).__name__}); adapters cannot be inserted")
    if cfg.hyp:
        decoder = getattr(model, "mask_decoder", None)
        transformer = getattr(decoder, "transformer", None)
        if type(transformer) is not TwoWayTransformer:
            raise InputError("HyP-Adpt needs the SAM mask decoder's two-way transformer; set adapter.hyp: false")
        kw = _factory(transformer)
        dim = int(transformer.embedding_dim)
        transformer.__class__ = AdaptedTwoWayTransformer
        transformer.adapter_hyp_in = HyperPromptAdapter(dim, dim, cfg.hyp_rank, **kw)
        transformer.adapter_hyp_out = HyperPromptAdapter(dim, dim, cfg.hyp_rank, **kw)
        transformer.n_output_tokens = 1 + int(decoder.num_mask_tokens)
    model.adapter_config = cfg.to_dict()
    if freeze:
        for name, p in model.named_parameters():
            p.requires_grad_(is_adapter_key(name))
    return model


def set_slab_depth(model: nn.Module, depth: int) -> None:
    """Change the SD-Trans slab depth D of every adapted block (see the slab rule)."""
    if int(depth) < 1:
        raise ValueError("the slab depth must be at least 1")
    for m in model.modules():
        if isinstance(m, (AdaptedViTBlock, AdaptedTinyViTBlock)):
            m.sd_depth = int(depth)


@torch.no_grad()
def embed_slab(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Embed a slab (D, 3, S, S) of consecutive slices together (SD-Trans context) -> (D, C, E, E)."""
    was = [(m, m.sd_depth) for m in model.modules() if isinstance(m, (AdaptedViTBlock, AdaptedTinyViTBlock))]
    try:
        set_slab_depth(model, images.shape[0])
        return model.image_encoder(images)
    finally:
        for m, d in was:
            m.sd_depth = d


def adapter_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_adapter_key(n)]


def adapter_state(model: nn.Module, prefixes: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """The adapters' state (CPU copies), plus the base keys starting with any of ``prefixes``
    (e.g. ``("mask_decoder.",)`` when the decoder was trained too)."""
    prefixes = tuple(prefixes)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if is_adapter_key(k) or (prefixes and k.startswith(prefixes))}


def count_parameters(model: nn.Module) -> Dict[str, Any]:
    """Parameter counts of an adapted model: base / adapters, for the encoder and in total."""
    enc_base = enc_ad = all_base = all_ad = 0
    for name, p in model.named_parameters():
        n = p.numel()
        ad = is_adapter_key(name)
        if ad:
            all_ad += n
        else:
            all_base += n
        if name.startswith("image_encoder."):
            if ad:
                enc_ad += n
            else:
                enc_base += n
    return {"encoder_base": enc_base, "encoder_adapters": enc_ad,
            "encoder_fraction": enc_ad / enc_base if enc_base else 0.0,
            "decoder_adapters": all_ad - enc_ad, "base": all_base, "adapters": all_ad,
            "fraction": all_ad / all_base if all_base else 0.0}


__all__ = [
    "ADAPTER_KIND", "AdaptedTinyViTBlock", "AdaptedTwoWayTransformer", "AdaptedViTBlock", "AdapterConfig",
    "BottleneckAdapter", "HyperPromptAdapter", "adapter_parameters", "adapter_state", "apply_adapters",
    "count_parameters", "embed_slab", "is_adapter_key", "set_slab_depth", "tiny_depth_attention",
    "vit_depth_attention",
]
