"""TinyViT image encoder in the LiteMedSAM configuration.

A hierarchical encoder: a pointwise-conv stem, one stage of inverted-residual (MBConv) blocks,
then three stages of windowed-attention blocks with learned per-offset attention biases, each
stage joined by a conv "patch merging" layer, and the SAM neck on top. LiteMedSAM feeds a
256x256 image and gets a 64x64x256 embedding: the stem keeps full resolution, the first two
merges halve it and the last one keeps it.

Module and parameter names follow the LiteMedSAM checkpoint exactly (``patch_embed.seq``,
``layers.N.blocks.M`` / ``layers.N.downsample``, ``Conv2d_BN`` as ``c`` + ``bn``, ``neck``).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from samliverseg.modeling.common import DropPath, LayerNorm2d, to_2tuple, trunc_normal_


class Conv2d_BN(nn.Sequential):  # noqa: N801 (the checkpoint's naming)
    """Bias-free convolution followed by BatchNorm (children ``c`` and ``bn``)."""

    def __init__(self, in_chans, out_chans, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, ks, stride, pad, dilation, groups, bias=False))
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0.0)
        self.add_module("bn", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.bn.track_running_stats or self.bn.running_var is None:
            return self.bn(self.c(x))
        weight, bias = self.folded()
        c = self.c
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The BatchNorm folded into the convolution: (weight, bias) of one equivalent conv.

        Inference computes it once and keeps it until a parameter or running statistic changes
        (in place, by a load or a move to another device: the tensors' versions and storage are
        the key). While gradients flow into the parameters it is recomputed each call, so that
        training in eval mode still reaches them. The state dict is unchanged (``c`` + ``bn``).
        """
        c, bn = self.c, self.bn
        tensors = (c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors) + (bn.eps,)
        cached = self.__dict__.get("_folded")
        if not needs_grad and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.set_grad_enabled(needs_grad):
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight = c.weight * scale.reshape(-1, 1, 1, 1)
            bias = bn.bias - bn.running_mean * scale
        # Not kept from inference mode: its tensors could not take part in autograd later.
        if not needs_grad and not torch.is_inference_mode_enabled():
            self.__dict__["_folded"] = (key, weight, bias)
        return weight, bias


class PatchEmbed(nn.Module):
    """Stem: two pointwise Conv2d_BN with an activation between them (resolution unchanged)."""

    def __init__(self, in_chans: int, embed_dim: int, resolution, activation: Type[nn.Module]):
        super().__init__()
        self.patches_resolution = to_2tuple(resolution)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        hidden = embed_dim // 2
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, hidden, 1, 1, 0),
            activation(),
            Conv2d_BN(hidden, embed_dim, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: expand 1x1 -> depthwise 3x3 -> project 1x1, residual, activation."""

    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float, activation, drop_path: float):
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.in_chans, self.hidden_chans, self.out_chans = in_chans, hidden, out_chans
        self.conv1 = Conv2d_BN(in_chans, hidden, ks=1)
        self.act1 = activation()
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = activation()
        self.conv3 = Conv2d_BN(hidden, out_chans, ks=1, bn_weight_init=0.0)
        self.act3 = activation()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.drop_path(self.conv3(y))
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """1x1 conv -> depthwise 3x3 (stride ``stride``) -> 1x1 conv; returns tokens (B, L, C)."""

    def __init__(self, input_resolution, dim: int, out_dim: int, activation, stride: int = 2):
        super().__init__()
        self.input_resolution = to_2tuple(input_resolution)
        self.dim, self.out_dim, self.stride = dim, out_dim, stride
        self.act = activation()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # tokens (B, L, C) -> (B, C, H, W)
            h, w = self.input_resolution
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """A stage of MBConv blocks on (B, C, H, W), optionally followed by a PatchMerging."""

    def __init__(self, dim, input_resolution, depth, activation, drop_path=0.0, downsample=None,
                 out_dim=None, conv_expand_ratio=4.0):
        super().__init__()
        self.dim, self.input_resolution, self.depth = dim, input_resolution, depth
        rates = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            MBConv(dim, dim, conv_expand_ratio, activation, rates[i]) for i in range(depth)
        )
        self.downsample = downsample(input_resolution, dim=dim, out_dim=out_dim, activation=activation) \
            if downsample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class Mlp(nn.Module):
    """LayerNorm -> fc1 -> act -> fc2 (names ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.norm(x))))
        return self.drop(self.fc2(x))


def _offset_index(resolution: Tuple[int, int]) -> Tuple[torch.Tensor, int]:
    """Index (N, N) of the bias for each pair of window positions, and the number of biases.

    A pair of positions at (|dy|, |dx|) apart shares one learned bias per head, numbered
    ``|dy| * width + |dx|`` (the order in which the offsets first appear in a raster scan).
    """
    h, w = resolution
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * w + dx, h * w


class Attention(nn.Module):
    """Window self-attention with a learned bias per head and relative offset.

    ``qkv`` packs, per head, ``key_dim`` query, ``key_dim`` key and ``attn_ratio*key_dim`` value
    features; the LayerNorm is applied inside (``norm``).
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4,
                 resolution: Tuple[int, int] = (14, 14)):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.scale = key_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        index, n_offsets = _offset_index(to_2tuple(resolution))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n_offsets))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        # A 4D bias (1, heads, N, N): with a 3D mask PyTorch takes its slow unfused attention.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


class TinyViTBlock(nn.Module):
    """Window attention (zero-padded windows) -> depthwise local conv -> MLP, on tokens (B, L, C)."""

    def __init__(self, dim, input_resolution, num_heads, window_size=7, mlp_ratio=4.0, drop=0.0,
                 drop_path=0.0, local_conv_size=3, activation=nn.GELU):
        super().__init__()
        if window_size <= 0:
            raise ValueError("window_size must be positive")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.num_heads = num_heads
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.attn = Attention(dim, dim // num_heads, num_heads, attn_ratio=1,
                              resolution=(window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=activation, drop=drop)
        self.local_conv = Conv2d_BN(dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            return self.attn(x)
        grid = x.view(b, h, w, c)
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        nh, nw = hp // ws, wp // ws
        windows = grid.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        windows = self.attn(windows)
        grid = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        if pad_h or pad_w:
            grid = grid[:, :h, :w]
        return grid.reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"TinyViT block expects {h}x{w} tokens, got {n}")
        x = x + self.drop_path(self._window_attention(x))
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).reshape(b, c, n).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, mlp_ratio={self.mlp_ratio}")


class BasicLayer(nn.Module):
    """A stage of TinyViT blocks, optionally followed by a PatchMerging."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4.0, drop=0.0,
                 drop_path=0.0, downsample=None, local_conv_size=3, activation=nn.GELU, out_dim=None):
        super().__init__()
        self.dim, self.input_resolution, self.depth = dim, input_resolution, depth
        rates = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                         drop=drop, drop_path=rates[i], local_conv_size=local_conv_size, activation=activation)
            for i in range(depth)
        )
        self.downsample = downsample(input_resolution, dim=dim, out_dim=out_dim, activation=activation) \
            if downsample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT encoder + SAM neck: (B, 3, S, S) -> (B, out_chans, S/4, S/4) for 4 stages."""

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(window_sizes) == n_stages >= 2):
            raise ValueError("embed_dims, depths, num_heads and window_sizes must have the same length (>= 2)")
        self.img_size = img_size
        self.depths = list(depths)
        activation = nn.GELU
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], img_size, activation)
        base_h, base_w = self.patch_embed.patches_resolution
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        # Stage i runs at base / 2**i, except that the last merge keeps the resolution
        # (so 256 -> 256, 128, 64, 64 for LiteMedSAM).
        resolutions: List[Tuple[int, int]] = []
        for i in range(n_stages):
            f = 2 ** min(i, n_stages - 2)
            resolutions.append((base_h // f, base_w // f))

        self.layers = nn.ModuleList()
        for i in range(n_stages):
            last = i == n_stages - 1
            stride = 1 if i == n_stages - 2 else 2

            def make_merge(res, dim, out_dim, activation, _stride=stride):
                return PatchMerging(res, dim, out_dim, activation, stride=_stride)

            common = dict(
                dim=embed_dims[i],
                input_resolution=resolutions[i],
                depth=depths[i],
                drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])],
                downsample=None if last else make_merge,
                out_dim=embed_dims[min(i + 1, n_stages - 1)],
                activation=activation,
            )
            if i == 0:
                layer = ConvLayer(conv_expand_ratio=mbconv_expand_ratio, **common)
            else:
                layer = BasicLayer(num_heads=num_heads[i], window_size=window_sizes[i], mlp_ratio=mlp_ratio,
                                   drop=drop_rate, local_conv_size=local_conv_size, **common)
            self.layers.append(layer)
        self.out_resolution = resolutions[-1]

        self.apply(self._init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != torch.Size(self.patch_embed.patches_resolution):
            raise ValueError(
                f"TinyViT expects {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}"
            )
        if x.device.type == "cpu":
            # The full-resolution MBConv stage (depthwise convs) runs ~20% faster channels-last
            # on CPU; the result is the same.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        h, w = self.out_resolution
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return self.neck(x)
