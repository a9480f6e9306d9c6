"""SAM-Med3D's image encoder: a 3D ViT on a single-channel cube.

Pipeline for an input ``x`` of shape (B, 1, S, S, S) (S = 128 for SAM-Med3D, patch p = 16):

1. patch embedding: ``Conv3d(1, C, kernel=p, stride=p)`` -> tokens (B, G, G, G, C), G = S / p;
2. a learnable absolute position embedding ``pos_embed`` (1, G, G, G, C) is added;
3. ``depth`` transformer blocks: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. The
   attention adds *decomposed 3D relative positions* (MViTv2): for a query at (d, h, w) and a
   key at (d', h', w') the logit is

       q.k / sqrt(c) + q . Rd[d - d' + Ld - 1] + q . Rh[h - h' + Lh - 1] + q . Rw[w - w' + Lw - 1]

   with one learnable table per axis (``rel_pos_d``, ``rel_pos_h``, ``rel_pos_w``; 2L-1 rows of
   head_dim each, L the side of the attended cube). Blocks listed in ``global_attn_indexes``
   attend over the whole G^3 grid; the others over windows of ``window_size``^3 tokens. As in the
   published model, the grid is zero-padded at the end of each axis up to a multiple of the
   window (SAM-Med3D: G = 8 padded to a single 14^3 window), and the padding tokens take part as
   keys; only the real tokens' outputs are kept. When the grid fits in one window, only the
   real tokens are computed as queries (same result, about 5x less work);
4. a neck: ``Conv3d(C, out, 1)``, LayerNorm3d, ``Conv3d(out, out, 3, padding=1)``, LayerNorm3d
   -> the image embedding (B, out, G, G, G).

The axes of the cube are the tensor's dims 2, 3, 4 (called d, h, w here); which patient axis
each one is, is decided by the caller (``engine3d.py``). Parameter names and shapes are those of
the published SAM-Med3D checkpoints (``image_encoder.*``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from samliverseg.modeling.common import MLPBlock

Size3 = Tuple[int, int, int]


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor (eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).square().mean(dim=1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight[:, None, None, None] + self.bias[:, None, None, None]


class PatchEmbed3D(nn.Module):
    """(B, in, S, S, S) -> (B, S/p, S/p, S/p, C) with a p^3 convolution of stride p."""

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


def relative_position_table(size_q: int, size_k: int, table: torch.Tensor) -> torch.Tensor:
    """Rows of a relative-position table for every (query, key) pair along one axis.

    ``table`` has 2L-1 rows (offsets -(L-1)..L-1); it is linearly resampled when the attended
    size differs from the one it was made for. Returns (size_q, size_k, C) with entry
    [a, b] = table[a - b + size_k - 1] (for equal sizes; unequal sizes scale the coordinates
    of the shorter axis, as in SAM).
    """
    n = 2 * max(size_q, size_k) - 1
    if table.shape[0] != n:
        table = F.interpolate(table.t().unsqueeze(0), size=n, mode="linear").squeeze(0).t()
    q = torch.arange(size_q, device=table.device)[:, None] * max(size_k / size_q, 1.0)
    k = torch.arange(size_k, device=table.device)[None, :] * max(size_q / size_k, 1.0)
    offsets = (q - k) + (size_k - 1) * max(size_q / size_k, 1.0)
    return table[offsets.long()]


class Attention3D(nn.Module):
    """Multi-head self-attention over a cube of tokens with decomposed 3D relative positions."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 input_size: Optional[Size3] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is needed for relative positions")
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, self.head_dim))

    def forward(self, x: torch.Tensor, queries: Optional[Size3] = None) -> torch.Tensor:
        """x: (B, D, H, W, C) -> (B, qd, qh, qw, C).

        ``queries=(qd, qh, qw)`` computes the outputs of the tokens ``x[:, :qd, :qh, :qw]`` only
        (all tokens are still keys); the default is every token.
        """
        b, d, h, w, c = x.shape
        qd, qh, qw = queries if queries is not None else (d, h, w)
        nh, hd = self.num_heads, self.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(x.reshape(b, d * h * w, c), weight[c:], None if bias is None else bias[c:])
        k, v = kv.reshape(b, d * h * w, 2, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, Nk, hd)
        xq = x[:, :qd, :qh, :qw].reshape(b, qd * qh * qw, c)
        q = F.linear(xq, weight[:c], None if bias is None else bias[:c])
        q = q.reshape(b, qd * qh * qw, nh, hd).transpose(1, 2)  # (B, nh, Nq, hd)
        mask = None
        if self.use_rel_pos:
            rd = relative_position_table(d, d, self.rel_pos_d)[:qd]  # (qd, D, hd)
            rh = relative_position_table(h, h, self.rel_pos_h)[:qh]
            rw = relative_position_table(w, w, self.rel_pos_w)[:qw]
            rq = q.reshape(b, nh, qd, qh, qw, hd)
            bias_d = torch.einsum("bndhwc,dkc->bndhwk", rq, rd)
            bias_h = torch.einsum("bndhwc,hkc->bndhwk", rq, rh)
            bias_w = torch.einsum("bndhwc,wkc->bndhwk", rq, rw)
            mask = (bias_d[..., :, None, None] + bias_h[..., None, :, None] + bias_w[..., None, None, :])
            mask = mask.reshape(b, nh, qd * qh * qw, d * h * w).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, qd, qh, qw, c)
        return self.proj(out)


def window_partition3d(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Size3]:
    """(B, D, H, W, C) -> (B * n_windows, window, window, window, C), zero-padded at the end of
    each axis to a multiple of ``window``; also returns the padded size (Dp, Hp, Wp)."""
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % window, (-h) % window, (-w) % window
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.reshape(b, dp // window, window, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return windows, (dp, hp, wp)


def window_unpartition3d(windows: torch.Tensor, window: int, padded: Size3, size: Size3) -> torch.Tensor:
    """Inverse of :func:`window_partition3d`, padding removed: -> (B, D, H, W, C)."""
    dp, hp, wp = padded
    d, h, w = size
    nd, nh, nw = dp // window, hp // window, wp // window
    b = windows.shape[0] // (nd * nh * nw)
    x = windows.reshape(b, nd, nh, nw, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w].contiguous()


class Block3D(nn.Module):
    """Pre-norm transformer block; window attention when ``window_size`` > 0, else global."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, act_layer: Type[nn.Module] = nn.GELU,
                 use_rel_pos: bool = False, window_size: int = 0, input_size: Optional[Size3] = None) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        attn_size = input_size if window_size == 0 else (window_size, window_size, window_size)
        self.attn = Attention3D(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                                input_size=attn_size)
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor, fast_single_window: bool = True) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        ws = self.window_size
        if ws > 0:
            size = tuple(x.shape[1:4])
            if fast_single_window and all(s <= ws for s in size):
                pad = (0, 0, 0, ws - size[2], 0, ws - size[1], 0, ws - size[0])
                x = self.attn(F.pad(x, pad), queries=size)  # type: ignore[arg-type]
            else:
                windows, padded = window_partition3d(x, ws)
                x = window_unpartition3d(self.attn(windows), ws, padded, size)  # type: ignore[arg-type]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """(B, 1, S, S, S) -> (B, out_chans, S/p, S/p, S/p); see the module docstring."""

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        norm = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, mlp_ratio, qkv_bias, norm, nn.GELU, use_rel_pos,
                    window_size=0 if i in tuple(global_attn_indexes) else window_size,
                    input_size=(grid, grid, grid))
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
