"""A literal, slow re-statement of the official AllSpark model in plain PyTorch (no mmcv, einops or timm).

It restates the released code of xmed-lab/AllSpark (``model/backbone/mit.py``, ``model/semseg/allspark.py``,
``model/semseg/semidec_base.py``, ``model/model_helper.py``) module by module, with the official module and buffer
names, so its ``state_dict()`` has exactly the keys of the official ``ModelBuilder`` (without DDP's ``module.``).
Everything the official code does is kept, including what this package fixes: keys/values materialised once per
labeled sample with ``repeat``, the per-sample, per-class ``_dequeue_and_enqueue`` loop with host synchronisations,
``nn.InstanceNorm2d(num_heads)`` applied to the 1-channel cross-attention logits (its warning is silenced locally),
eval-time duplication of the input, state passed through setters, and the square memory grid
``(image_size // 32 + 1) ** 2``. The only departures: ``SyncBN`` is a plain ``BatchNorm2d`` (one process), and the
constructors take the sizes the official code reads from its YAML configs (``patch_num`` may also be given directly,
so tests can build tiny models).

The tests use it to check the parity of :mod:`allspark_seg` in faithful mode; the benchmarks use it as the literal
baseline. Calling convention of one official training step (``train_allspark.py``)::

    model.eval(); pred_u = model(x_u)                     # teacher pass, batch-coupled
    model.decoder.set_pseudo_prob_map(pred_u)
    model.decoder.set_SMem_status(epoch)
    model.train(); preds = model(torch.cat([x_l, x_u]))  # needs B_l == B_u
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MIT_SETTINGS",
    "AllSpark",
    "BaselineDecoder",
    "CrossAttnMem",
    "MixVisionTransformer",
    "ModelBuilder",
    "SegFormerHead",
    "SemiDecoder",
    "build_official_model",
    "mit",
]


# ---------------------------------------------------------------------------------------------------------------------
# Backbone: model/backbone/mit.py
# ---------------------------------------------------------------------------------------------------------------------
def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """timm's stochastic depth: keep a sample with probability ``1 - drop_prob`` and rescale."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    """timm's ``DropPath`` module."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class DWConv(nn.Module):
    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803
        B, N, C = x.shape
        x = x.transpose(1, 2).contiguous().view(B, C, H, W)
        x = self.dwconv(x)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803
        x = self.fc1(x)
        x = self.dwconv(x, H, W)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} should be divided by num_heads {num_heads}."
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
            x_ = self.sr(x_).reshape(B, C, -1).permute(0, 2, 1)
            x_ = self.norm(x_)
            kv = self.kv(x_).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        else:
            kv = self.kv(x).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        sr_ratio: int = 1,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x), H, W


class MixVisionTransformer(nn.Module):
    """The official MiT: ``patch_embed1..4``, ``block1..4``, ``norm1..4``; block/stage norms use ``norm_eps``."""

    def __init__(
        self,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        depths: Sequence[int] = (3, 6, 40, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.depths = list(depths)
        self.patch_embed1 = OverlapPatchEmbed(7, 4, in_chans, embed_dims[0])
        self.patch_embed2 = OverlapPatchEmbed(3, 2, embed_dims[0], embed_dims[1])
        self.patch_embed3 = OverlapPatchEmbed(3, 2, embed_dims[1], embed_dims[2])
        self.patch_embed4 = OverlapPatchEmbed(3, 2, embed_dims[2], embed_dims[3])
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        cur = 0
        for i in range(4):
            blocks = nn.ModuleList(
                [
                    Block(
                        embed_dims[i],
                        num_heads[i],
                        mlp_ratios[i],
                        qkv_bias,
                        drop_rate,
                        attn_drop_rate,
                        dpr[cur + j],
                        norm_eps,
                        sr_ratios[i],
                    )
                    for j in range(depths[i])
                ]
            )
            self.add_module(f"block{i + 1}", blocks)
            self.add_module(f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=norm_eps))
            cur += depths[i]
        self.inplanes = list(embed_dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B = x.shape[0]
        outs = []
        for i in range(1, 5):
            x, H, W = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, H, W)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


_WIDE = (64, 128, 320, 512)
MIT_SETTINGS: dict[str, dict[str, tuple[int, ...]]] = {
    "mit_b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "mit_b1": {"embed_dims": _WIDE, "depths": (2, 2, 2, 2)},
    "mit_b2": {"embed_dims": _WIDE, "depths": (3, 4, 6, 3)},
    "mit_b3": {"embed_dims": _WIDE, "depths": (3, 4, 18, 3)},
    "mit_b4": {"embed_dims": _WIDE, "depths": (3, 8, 27, 3)},
    "mit_b5": {"embed_dims": _WIDE, "depths": (3, 6, 40, 3)},
}


def mit(variant: str = "mit_b5", **overrides: object) -> MixVisionTransformer:
    """An official MiT variant (heads 1, 2, 5, 8; drop-path 0.1; eps 1e-6), with keyword overrides, no weights."""
    kwargs: dict[str, object] = {"num_heads": (1, 2, 5, 8), "qkv_bias": True, "drop_path_rate": 0.1}
    kwargs.update(MIT_SETTINGS[variant])
    kwargs.update(overrides)
    return MixVisionTransformer(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# AllSpark: model/semseg/allspark.py
# ---------------------------------------------------------------------------------------------------------------------
class CrossAttnMem(nn.Module):
    def __init__(
        self, num_heads: int, embedding_channels: int, attention_dropout_rate: float, num_class: int, patch_num: int
    ) -> None:
        super().__init__()
        self.KV_size = embedding_channels * num_heads
        self.num_class = num_class
        self.patch_num = patch_num
        self.num_heads = num_heads
        self.attention_head_size = embedding_channels
        width = embedding_channels * num_heads
        self.q_u = nn.Linear(embedding_channels, width, bias=False)
        self.k_u = nn.Linear(embedding_channels, width, bias=False)
        self.v_u = nn.Linear(embedding_channels, width, bias=False)
        self.q_l2u = nn.Linear(embedding_channels, width, bias=False)
        self.k_l2u = nn.Linear(embedding_channels, width, bias=False)
        self.v_l2u = nn.Linear(embedding_channels, width, bias=False)
        self.psi = nn.InstanceNorm2d(self.num_heads)
        self.softmax = nn.Softmax(dim=3)
        self.out_u = nn.Linear(width, embedding_channels, bias=False)
        self.out_l2u = nn.Linear(width, embedding_channels, bias=False)
        self.attn_dropout = nn.Dropout(attention_dropout_rate)
        self.proj_dropout = nn.Dropout(attention_dropout_rate)
        self.pseudo_label = None
        self.SMem_size = embedding_channels
        self.register_buffer("queue_ptr", torch.zeros(self.num_class, dtype=torch.long))
        self.register_buffer("kv_queue", torch.randn(self.num_class, self.SMem_size, self.patch_num))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, emb_u_: torch.Tensor, channel_cls: torch.Tensor) -> None:
        """FIFO update of the Semantic Memory with one sample's ``(N, C)`` features, class by class."""
        label = torch.unique(channel_cls).detach().cpu()
        label = label[label != 255]
        for cls_i in label.tolist():
            channel_cls_i = torch.where(channel_cls == int(cls_i), 1, 0)
            index = torch.squeeze(torch.nonzero(channel_cls_i), dim=-1)
            emb_u_i = emb_u_[:, index].transpose(-2, -1)
            channel_num = emb_u_i.size(0)
            ptr_i = int(self.queue_ptr[cls_i])
            if ptr_i + channel_num > self.SMem_size:  # queue full
                self.kv_queue[cls_i, ptr_i:, :] = emb_u_i[: self.SMem_size - ptr_i, :]
                self.kv_queue[cls_i, : ptr_i + channel_num - self.SMem_size, :] = emb_u_i[self.SMem_size - ptr_i :, :]
                new_ptr = ptr_i + channel_num - self.SMem_size
            else:
                self.kv_queue[cls_i, ptr_i : ptr_i + channel_num, :] = emb_u_i
                new_ptr = (ptr_i + channel_num) % self.SMem_size
            self.queue_ptr[cls_i] = new_ptr

    def multi_head_rep(self, x: torch.Tensor) -> torch.Tensor:
        new_x_shape = x.size()[:-1] + (self.num_heads, self.attention_head_size)
        return x.view(*new_x_shape).permute(0, 2, 1, 3)

    def _psi(self, x: torch.Tensor) -> torch.Tensor:
        # The official code applies InstanceNorm2d(num_heads) to the 1-channel cross logits too; PyTorch warns that
        # the channel count does not match num_features and normalises anyway (affine=False, so nothing is used).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input's size at dim=1 does not match num_features.*")
            return self.psi(x)

    def forward(
        self, emb: torch.Tensor, pseudo_label: torch.Tensor | None, pseudo_prob_map: torch.Tensor, using_SMem: bool
    ) -> torch.Tensor:
        emb_l, emb_u = torch.split(emb, emb.size(0) // 2, dim=0)
        _, N, C = emb_u.size()

        if self.training:
            with torch.no_grad():
                # Channel-wise Semantic Grouping
                pseudo_prob_map = F.interpolate(
                    pseudo_prob_map, size=(int(math.sqrt(N)), int(math.sqrt(N))), mode="bilinear", align_corners=False
                )
                pseudo_prob_map = torch.flatten(pseudo_prob_map, start_dim=2, end_dim=-1)
                cls_sim_matrix = torch.matmul(F.normalize(pseudo_prob_map, dim=-1), F.normalize(emb_u, dim=1))
                channel_cls = torch.argmax(cls_sim_matrix, dim=1)
                # update the Semantic Memory (S-Mem)
                for b in range(emb_u.size(0)):
                    self._dequeue_and_enqueue(emb_u[b, :, :], channel_cls[b, :])

        q_u = self.q_u(emb_u)
        k_u = self.k_u(emb_u)
        v_u = self.v_u(emb_u)
        mh_q_u = self.multi_head_rep(q_u).transpose(-1, -2)
        mh_k_u = self.multi_head_rep(k_u)
        mh_v_u = self.multi_head_rep(v_u).transpose(-1, -2)
        self_attn_u = torch.matmul(mh_q_u, mh_k_u)
        self_attn_u = self.attn_dropout(self.softmax(self._psi(self_attn_u)))
        self_attn_u = torch.matmul(self_attn_u, mh_v_u)
        self_attn_u = self_attn_u.permute(0, 3, 2, 1).contiguous()
        self_attn_u = self_attn_u.view(*self_attn_u.size()[:-2], self.KV_size)
        out_u = self.proj_dropout(self.out_u(self_attn_u))

        q_l2u = self.q_l2u(emb_l)
        if using_SMem and self.training:
            features_mem = self.kv_queue.clone()
            features_mem_re = features_mem.transpose(-1, -2)
            k_l2u = self.k_l2u(features_mem_re)
            v_l2u = self.v_l2u(features_mem_re)
        else:
            k_l2u = self.k_l2u(emb_u)
            v_l2u = self.v_l2u(emb_u)
        batch_size = q_l2u.size(0)
        # einops: rearrange 'b n c -> n (b c)', then repeat 'n bc -> r n bc' (a real copy per labeled sample)
        k_l2u = k_l2u.permute(1, 0, 2).reshape(k_l2u.size(1), -1)
        v_l2u = v_l2u.permute(1, 0, 2).reshape(v_l2u.size(1), -1)
        k_l2u = k_l2u.unsqueeze(0).repeat(batch_size, 1, 1)
        v_l2u = v_l2u.unsqueeze(0).repeat(batch_size, 1, 1)
        q_l2u = q_l2u.unsqueeze(1).transpose(-1, -2)
        k_l2u = k_l2u.unsqueeze(1)
        v_l2u = v_l2u.unsqueeze(1).transpose(-1, -2)
        cross_attn_l2u = torch.matmul(q_l2u, k_l2u)
        cross_attn_l2u = self.attn_dropout(self.softmax(self._psi(cross_attn_l2u)))
        cross_attn_l2u = torch.matmul(cross_attn_l2u, v_l2u)
        cross_attn_l2u = cross_attn_l2u.permute(0, 3, 2, 1).contiguous()
        cross_attn_l2u = cross_attn_l2u.view(*cross_attn_l2u.size()[:-2], self.KV_size)
        out_l2u = self.proj_dropout(self.out_l2u(cross_attn_l2u))

        return torch.cat([out_l2u, out_u], dim=0)


class AllSpark(nn.Module):
    def __init__(
        self,
        num_heads: int,
        embedding_channels: int,
        channel_num: int,
        channel_num_out: int,
        attention_dropout_rate: float,
        num_class: int,
        patch_num: int,
    ) -> None:
        super().__init__()
        self.map_in = nn.Sequential(nn.Conv2d(channel_num, embedding_channels, kernel_size=1, padding=0), nn.GELU())
        self.attn_norm = nn.LayerNorm(embedding_channels, eps=1e-6)
        self.attn = CrossAttnMem(num_heads, embedding_channels, attention_dropout_rate, num_class, patch_num)
        self.encoder_norm = nn.LayerNorm(embedding_channels, eps=1e-6)
        self.map_out = nn.Sequential(
            nn.Conv2d(embedding_channels, channel_num_out, kernel_size=1, padding=0), nn.GELU()
        )
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=1e-6)

    def forward(
        self, en: torch.Tensor, pseudo_label: torch.Tensor | None, pseudo_prob_map: torch.Tensor, using_SMem: bool
    ) -> torch.Tensor:
        if not self.training:
            en = torch.cat((en, en))
        _, _, h, w = en.shape
        en = self.map_in(en)
        en = en.flatten(2).transpose(-1, -2)  # (B, n_patches, hidden)
        emb = self.attn_norm(en)
        emb = self.attn(emb, pseudo_label, pseudo_prob_map, using_SMem)
        emb = emb + en
        out = self.encoder_norm(emb)
        B, _, hidden = out.size()
        out = out.permute(0, 2, 1).contiguous().view(B, hidden, h, w)
        out = self.map_out(out)
        if not self.training:
            out = torch.split(out, out.size(0) // 2, dim=0)[0]
        return out


# ---------------------------------------------------------------------------------------------------------------------
# SegFormer head (mmcv ConvModule restated) and the decoders
# ---------------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear Embedding."""

    def __init__(self, input_dim: int = 2048, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.proj(x)


class ConvModule(nn.Module):
    """mmcv ``ConvModule(k=1, norm_cfg=SyncBN)``: conv (no bias since a norm follows), ``bn``, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.bn.weight, 1)
        nn.init.constant_(self.bn.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    def __init__(self, embedding_dim: int, in_channels: Sequence[int], num_class: int) -> None:
        super().__init__()
        c1_in_channels, c2_in_channels, c3_in_channels, c4_in_channels = in_channels
        self.linear_c4 = MLP(input_dim=c4_in_channels, embed_dim=embedding_dim)
        self.linear_c3 = MLP(input_dim=c3_in_channels, embed_dim=embedding_dim)
        self.linear_c2 = MLP(input_dim=c2_in_channels, embed_dim=embedding_dim)
        self.linear_c1 = MLP(input_dim=c1_in_channels, embed_dim=embedding_dim)
        self.linear_fuse = ConvModule(embedding_dim * 4, embedding_dim, kernel_size=1)
        self.dropout = nn.Dropout2d(0.1)
        self.linear_pred = nn.Conv2d(embedding_dim, num_class, kernel_size=1)

    def forward(self, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        n = c4.shape[0]
        _c4 = self.linear_c4(c4).permute(0, 2, 1).contiguous().reshape(n, -1, c4.shape[2], c4.shape[3])
        _c4 = F.interpolate(_c4, size=c1.size()[2:], mode="bilinear", align_corners=False)
        _c3 = self.linear_c3(c3).permute(0, 2, 1).contiguous().reshape(n, -1, c3.shape[2], c3.shape[3])
        _c3 = F.interpolate(_c3, size=c1.size()[2:], mode="bilinear", align_corners=False)
        _c2 = self.linear_c2(c2).permute(0, 2, 1).contiguous().reshape(n, -1, c2.shape[2], c2.shape[3])
        _c2 = F.interpolate(_c2, size=c1.size()[2:], mode="bilinear", align_corners=False)
        _c1 = self.linear_c1(c1).permute(0, 2, 1).contiguous().reshape(n, -1, c1.shape[2], c1.shape[3])
        _c = self.linear_fuse(torch.cat([_c4, _c3, _c2, _c1], dim=1))
        x = self.dropout(_c)
        return self.linear_pred(x)


class SemiDecoder(nn.Module):
    """AllSpark decoder (``model/semseg/allspark.py``).

    ``patch_num`` defaults to the official ``(image_size // 32 + 1) ** 2``; give it to build a memory of another grid.
    """

    def __init__(
        self,
        num_heads: int,
        num_class: int,
        in_planes: Sequence[int],
        image_size: int,
        warmup_epoch: int,
        embedding_dim: int,
        patch_num: int | None = None,
    ) -> None:
        super().__init__()
        self.pseudo_label = None
        self.pseudo_prob_map: torch.Tensor | None = None
        self.using_SMem = False
        self.warmup_epoch = warmup_epoch
        self.allspark = AllSpark(
            num_heads=num_heads,
            embedding_channels=in_planes[3],
            channel_num=in_planes[3],
            channel_num_out=in_planes[3],
            attention_dropout_rate=0.1,
            patch_num=(image_size // 32 + 1) ** 2 if patch_num is None else patch_num,
            num_class=num_class,
        )
        self.decoder = SegFormerHead(embedding_dim, in_planes, num_class)

    def set_pseudo_label(self, pseudo_label: torch.Tensor) -> None:
        self.pseudo_label = pseudo_label

    def set_pseudo_prob_map(self, pseudo_prob_map: torch.Tensor) -> None:
        self.pseudo_prob_map = pseudo_prob_map

    def set_SMem_status(self, epoch: int, isVal: bool = False) -> None:  # noqa: N802, N803
        self.using_SMem = epoch >= self.warmup_epoch and not isVal

    def forward(self, feats: Sequence[torch.Tensor], h: int, w: int) -> torch.Tensor:
        e1, e2, e3, e4 = feats
        e4_allspark = self.allspark(e4, self.pseudo_label, self.pseudo_prob_map, self.using_SMem)
        out = self.decoder(e1, e2, e3, e4_allspark)
        return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


class BaselineDecoder(nn.Module):
    """The SegFormer baseline decoder without AllSpark (``model/semseg/semidec_base.py``, ``SemiDecoder``)."""

    def __init__(self, num_class: int, in_planes: Sequence[int], embedding_dim: int, **kwargs: object) -> None:
        super().__init__()
        self.decoder = SegFormerHead(embedding_dim, in_planes, num_class)

    def forward(self, feats: Sequence[torch.Tensor], h: int, w: int) -> torch.Tensor:
        e1, e2, e3, e4 = feats
        out = self.decoder(e1, e2, e3, e4)
        return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


class ModelBuilder(nn.Module):
    """``model/model_helper.py``: ``backbone`` then ``decoder(feats, h, w)`` (modules given instead of a config)."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        c1, c2, c3, c4 = self.backbone(x)
        return self.decoder((c1, c2, c3, c4), h, w)


def build_official_model(
    num_class: int = 21,
    *,
    allspark: bool = True,
    embed_dims: Sequence[int] = (64, 128, 320, 512),
    depths: Sequence[int] = (3, 6, 40, 3),
    mit_heads: Sequence[int] = (1, 2, 5, 8),
    sr_ratios: Sequence[int] = (8, 4, 2, 1),
    drop_path_rate: float = 0.1,
    num_heads: int = 2,
    image_size: int = 513,
    patch_num: int | None = None,
    warmup_epoch: int = 5,
    embedding_dim: int = 768,
) -> ModelBuilder:
    """The official ``ModelBuilder`` for an AllSpark (or baseline) config; defaults are Pascal's MiT-B5 run.

    Args:
        num_class: K.
        allspark: AllSpark decoder (``SemiDecoder``) or the baseline SegFormer decoder.
        embed_dims, depths, mit_heads, sr_ratios, drop_path_rate: The MiT backbone.
        num_heads: AllSpark heads.
        image_size: Crop size; the memory grid is ``(image_size // 32 + 1) ** 2`` unless ``patch_num`` is given.
        patch_num: Tokens per memory slot N.
        warmup_epoch: First epoch that reads the memory (``set_SMem_status``).
        embedding_dim: SegFormer head width.
    """
    backbone = MixVisionTransformer(
        embed_dims=embed_dims,
        num_heads=mit_heads,
        depths=depths,
        sr_ratios=sr_ratios,
        drop_path_rate=drop_path_rate,
    )
    if allspark:
        decoder: nn.Module = SemiDecoder(
            num_heads, num_class, embed_dims, image_size, warmup_epoch, embedding_dim, patch_num=patch_num
        )
    else:
        decoder = BaselineDecoder(num_class, embed_dims, embedding_dim)
    return ModelBuilder(backbone, decoder)


def official_optimizer(ref: ModelBuilder, lr: float, lr_multi: float) -> torch.optim.SGD:
    """``train_allspark.py``'s optimiser: SGD, momentum 0.9, weight decay 1e-4, backbone at ``lr``, the rest at
    ``lr * lr_multi``."""
    backbone = list(ref.backbone.parameters())
    rest = [p for n, p in ref.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone, "lr": lr}, {"params": rest, "lr": lr * lr_multi}]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)


@torch.no_grad()
def official_teacher_pass(ref: ModelBuilder, x_u: torch.Tensor) -> torch.Tensor:
    """``train_allspark.py``'s teacher pass: the model in eval mode on the unlabeled batch, its logits and argmax
    handed to the decoder through the setters. Returns the teacher logits ``(B, K, H, W)``."""
    ref.eval()
    pred_u_pseudo = ref(x_u).detach()
    ref.decoder.set_pseudo_prob_map(pred_u_pseudo)
    ref.decoder.set_pseudo_label(pred_u_pseudo.argmax(dim=1))
    return pred_u_pseudo
