"""The AllSpark block: labeled stage-4 features reborn from unlabeled ones by channel-wise cross-attention.

Computation, as the official code does it (method doc 1.4-1.6), for labeled tokens ``T_l`` and unlabeled ``T_u``:

1. ``map_in`` (1x1 conv + GELU), flatten to tokens ``T`` ``(B, N, C)``, pre-norm ``Z = LN(T)``;
2. in training, Channel-wise Semantic Grouping of ``Z_u`` against the teacher's guide maps and a memory update;
3. unlabeled: multi-head channel self-attention (``heads`` heads of width C, C x C logits per head);
4. labeled: single-head channel cross-attention, 2C queries against the unlabeled keys/values of the whole batch or,
   when the memory is read, against the projected Semantic Memory (K x 2C key channels);
5. attention logits are standardised per matrix (InstanceNorm, "psi") instead of scaled by 1/sqrt(d);
6. residual with ``T`` (before the norm), post-norm, back to a map, ``map_out`` (1x1 conv + GELU).

Differences from the official code are options (defaults in brackets): keys/values are broadcast to the labeled
samples instead of repeated per sample [always]; labeled and unlabeled maps are separate arguments of any batch
sizes [always]; inference computes only the cross branch, per image [``per_image_eval=True``; the official
batch-coupled behaviour with ``coupled=True``]; guide maps as logits [official] or probabilities; memory length
free; zero-initialised memory with empty classes masked out [``randn``, official]; inference reads the Semantic
Memory, as the labeled training stream does after the warm-up, instead of keys from the image itself
[``infer_memory=False``, official].

``infer_memory``: the block gets a bool buffer ``memory_ready`` that a training forward reading the memory sets (it
travels with checkpoints and is copied to an EMA teacher with the other buffers). In eval mode, once it is set, every
image attends to the projected memory exactly as a labeled training sample does; before (during the warm-up) it uses
its own keys. The memory stores maps on the training crop's stage-4 grid; for an image whose grid differs, the
memory's channel maps are resized bilinearly to the image's grid before the projection (the projections act on the
slot axis, so resizing maps or projected keys gives the same keys). Attention logits are standardised per matrix
(psi), so the number of positions does not change their scale.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .attention import blocked_attention, psi_scale, sdpa_attention
from .layers import standardize
from .memory import MemoryInit, SemanticMemory, channel_grouping

__all__ = ["AllSparkBlock", "ChannelCrossAttention"]


def _attention_weights(
    logits: torch.Tensor, dropout: nn.Dropout, column_mask: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """psi-standardise logits ``(..., Q, S)``, softmax over ``S`` and apply dropout.

    Normalisation and softmax run in float32 even under autocast. With ``column_mask`` ``(S,)`` the statistics use
    only the valid columns and the others get zero weight.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32; float64 stays float64
    if column_mask is None:
        x = standardize(x, eps)
    else:
        m = column_mask.to(x.dtype)
        count = m.sum() * x.shape[-2]
        mean = (x * m).sum(dim=(-2, -1), keepdim=True) / count
        var = ((x - mean).square() * m).sum(dim=(-2, -1), keepdim=True) / count
        x = ((x - mean) * torch.rsqrt(var + eps)).masked_fill(~column_mask, float("-inf"))
    return dropout(x.softmax(dim=-1)).to(logits.dtype)


def _exporting() -> bool:
    """True while tracing for TorchScript or exporting to ONNX (the fused attention is a Python autograd Function)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _gather_from_all_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every process along dim 0, in rank order (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class ChannelCrossAttention(nn.Module):
    """Channel-wise attention with Semantic Memory (the official ``CrossAttnMem``).

    Args:
        dim: Token width C.
        num_heads: Heads of the unlabeled self-attention; every projection maps C -> ``num_heads * C``.
        num_classes: K, the number of memory classes.
        grid: ``(h, w)`` of the stage-4 map (the memory stores ``h * w`` values per slot).
        memory: Whether the block has a Semantic Memory.
        memory_length: Slots per class L; ``None`` means C (official). With L != C the memory keys and values get
            their own L -> ``num_heads * C`` projections ``k_mem``/``v_mem`` (the official projections mix the L
            slots of a class as if they were C channels, which needs L == C).
        memory_init: ``randn`` (official) or ``zeros`` with an empty-slot mask.
        attn_dropout: Rate of the attention-weight and output dropouts (0.1 hard-coded officially).
        grouping: Guide maps for the channel grouping: ``logits`` (official) or ``probs`` (paper).
        grouping_resize: ``bilinear`` (official) or ``area`` downsampling of the guide maps.
        gather_memory: Under ``torch.distributed``, enqueue the unlabeled channels of all processes so every copy
            of the memory is identical (default). ``False`` enqueues only local channels; combined with DDP's
            buffer broadcast this is the official behaviour where rank 0's memory wins.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_classes: int,
        grid: tuple[int, int],
        *,
        memory: bool = True,
        memory_length: int | None = None,
        memory_init: MemoryInit = "randn",
        attn_dropout: float = 0.1,
        grouping: Literal["logits", "probs"] = "logits",
        grouping_resize: Literal["bilinear", "area"] = "bilinear",
        gather_memory: bool = True,
    ) -> None:
        super().__init__()
        width = dim * num_heads
        self.dim = dim
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grouping = grouping
        self.grouping_resize = grouping_resize
        self.gather_memory = gather_memory
        for name in ("q_u", "k_u", "v_u", "q_l2u", "k_l2u", "v_l2u"):
            self.add_module(name, nn.Linear(dim, width, bias=False))
        self.out_u = nn.Linear(width, dim, bias=False)
        self.out_l2u = nn.Linear(width, dim, bias=False)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.proj_dropout = nn.Dropout(attn_dropout)
        self.memory: SemanticMemory | None = None
        self.k_mem: nn.Linear | None = None
        self.v_mem: nn.Linear | None = None
        if memory:
            length = dim if memory_length is None else memory_length
            self.memory = SemanticMemory(num_classes, length, grid, memory_init)
            if length != dim:
                self.k_mem = nn.Linear(length, width, bias=False)
                self.v_mem = nn.Linear(length, width, bias=False)

    # -- memory -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_memory(self, z_u: torch.Tensor, guide: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Group the unlabeled channels by class and enqueue them.

        Args:
            z_u: Normalised unlabeled tokens ``(B_u, N, C)``.
            guide: Teacher output ``(B_u, K, H, W)``.
            grid: ``(h, w)`` with ``h * w = N``.

        Returns:
            The class of every local channel ``(B_u, C)``.
        """
        assert self.memory is not None
        if tuple(grid) != self.memory.grid:
            raise ValueError(
                f"The Semantic Memory was built for a {self.memory.grid[0]} x {self.memory.grid[1]} stage-4 grid "
                f"but the training features are {grid[0]} x {grid[1]}: build the model with the training crop size."
            )
        classes = channel_grouping(
            z_u, guide, grid, use_probs=self.grouping == "probs", resize=self.grouping_resize
        )  # (B_u, C)
        maps, local = z_u.transpose(1, 2), classes  # (B_u, C, N) channel maps (a view), samples then channels
        if self.gather_memory:
            maps, local = _gather_from_all_ranks(maps), _gather_from_all_ranks(local)
        self.memory.enqueue(maps, local)
        return classes

    def _memory_keys_values(
        self, grid: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Project the memory into shared keys and values ``(N, K * 2C)`` and the valid-column mask.

        Args:
            grid: ``(h, w)`` of the queries' map; when it is not the memory's grid (or while exporting, where the
                graph must serve every size) the memory's channel maps are first resized to it (:func:`resize_maps`).
        """
        assert self.memory is not None
        bank = self.memory.bank
        if grid is not None and (tuple(grid) != self.memory.grid or _exporting()):
            bank = resize_maps(bank, self.memory.grid, grid)
        bank = bank.transpose(1, 2)  # (K, N, L)
        k_proj = self.k_mem if self.k_mem is not None else self.k_l2u
        v_proj = self.v_mem if self.v_mem is not None else self.v_l2u
        keys = _flatten_sources(k_proj(bank))  # (N, K * 2C)
        values = _flatten_sources(v_proj(bank))
        mask = None
        if self.memory.init == "zeros":
            mask = self.memory.class_mask().repeat_interleave(keys.shape[1] // self.num_classes)
        return keys, values, mask

    # -- attention branches -------------------------------------------------------------------------------------
    def self_attention(self, z_u: torch.Tensor) -> torch.Tensor:
        """Multi-head channel self-attention of unlabeled tokens ``(B, N, C)`` -> ``(B, N, C)``."""
        b, n, _ = z_u.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, heads, self.dim).permute(0, 2, 1, 3)  # (B, heads, N, C)

        q, k, v = split(self.q_u(z_u)), split(self.k_u(z_u)), split(self.v_u(z_u))
        attn = _attention_weights(q.transpose(-1, -2) @ k, self.attn_dropout)  # (B, heads, C, C)
        ctx = attn @ v.transpose(-1, -2)  # (B, heads, C, N)
        ctx = ctx.permute(0, 3, 2, 1).reshape(b, n, heads * self.dim)  # feature index = c * heads + h
        return self.proj_dropout(self.out_u(ctx))

    def cross_attention(
        self,
        z_l: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        column_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Single-head channel cross-attention of labeled tokens.

        Args:
            z_l: Labeled tokens ``(B, N, C)``.
            keys: Either shared key channels ``(N, S)`` for every labeled sample (broadcast, never copied) or
                per-sample keys ``(B, N, S)``.
            values: Same layout as ``keys``.
            column_mask: Optional ``(S,)`` bool, False for key channels to ignore.

        Returns:
            ``(B, N, C)``.
        """
        q = self.q_l2u(z_l)  # (B, N, 2C)
        if keys.ndim == 2 and column_mask is None and not _exporting():
            ctx = self._fused_cross_attention(q, keys, values)
        else:
            attn = _attention_weights(q.transpose(1, 2) @ keys, self.attn_dropout, column_mask)  # (B, 2C, S)
            ctx = attn @ values.transpose(-1, -2)  # (B, 2C, N)
        return self.proj_dropout(self.out_l2u(ctx.transpose(1, 2)))

    def _fused_cross_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The cross-attention with shared keys without the ``(B, 2C, S)`` logits (see :mod:`.attention`).

        psi's standardisation becomes a per-sample scale of the queries (softmax ignores the mean shift), the
        labeled samples' query channels are stacked as ``B * 2C`` rows against the shared key columns, and the
        attention runs in row blocks with the dropout of ``attn_dropout`` on the weights. (The zero-initialised
        memory with masked classes keeps the materialised path, where ``attn_dropout`` sees the weights.) A forward
        without autograd or dropout under CPU autocast (a bf16 run's teacher pass and inference) runs
        :func:`sdpa_attention` instead, faster there and as precise after the autocast rounding (:mod:`.attention`).

        Args:
            q: Queries ``(B, N, 2C)``.
            keys: ``(N, S)``.
            values: ``(N, S)``.

        Returns:
            ``(B, 2C, N)``.
        """
        b, n, d = q.shape
        scale = psi_scale(q, keys)  # (B,)
        rows = (q * scale[:, None, None]).transpose(1, 2).reshape(b * d, n)
        p = self.attn_dropout.p if self.attn_dropout.training else 0.0
        if p == 0.0 and not torch.is_grad_enabled() and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return sdpa_attention(rows, keys, values).view(b, d, n)
        return blocked_attention(rows, keys, values, None, p).view(b, d, n)

    def forward(
        self,
        z_l: torch.Tensor,
        z_u: torch.Tensor | None,
        *,
        use_memory: bool = False,
        coupled: bool = True,
        grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend. Without ``z_u`` (inference) labeled tokens use their own channels as keys and values.

        Args:
            z_l: Labeled tokens ``(B_l, N, C)``.
            z_u: Unlabeled tokens ``(B_u, N, C)`` or None.
            use_memory: Read keys/values from the Semantic Memory instead of the unlabeled batch.
            coupled: Without ``z_u``: share the channels of the whole batch as keys (official eval behaviour) instead
                of attending per image.
            grid: ``(h, w)`` of the tokens; with ``use_memory``, a grid other than the memory's resizes its maps
                (None: the memory's grid).

        Returns:
            ``(y_l (B_l, N, C), y_u (B_u, N, C) or None)``.
        """
        if use_memory:
            if self.memory is None:
                raise ValueError("use_memory=True but this AllSpark block was built without a Semantic Memory.")
            keys, values, mask = self._memory_keys_values(grid)
            y_l = self.cross_attention(z_l, keys, values, mask)
        else:
            source = z_l if z_u is None else z_u
            keys, values = self.k_l2u(source), self.v_l2u(source)  # (B, N, 2C)
            if z_u is None and not coupled:
                y_l = self.cross_attention(z_l, keys, values)
            else:
                y_l = self.cross_attention(z_l, _flatten_sources(keys), _flatten_sources(values))
        y_u = None if z_u is None else self.self_attention(z_u)
        return y_l, y_u


def _flatten_sources(x: torch.Tensor) -> torch.Tensor:
    """``(S_b, N, D)`` key channels of several sources -> ``(N, S_b * D)``, source-major ('b n c -> n (b c)')."""
    return x.permute(1, 0, 2).reshape(x.shape[1], -1)


def resize_maps(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize flattened spatial maps ``(..., h * w)`` on ``grid`` to ``size`` -> ``(..., H * W)``.

    ``align_corners=False``, as everywhere in the package; resizing to the same grid returns the maps unchanged.
    """
    lead = maps.shape[:-1]
    flat = maps.reshape(-1, 1, grid[0], grid[1])
    out = F.interpolate(flat, size=(size[0], size[1]), mode="bilinear", align_corners=False)
    return out.reshape(*lead, -1)


class AllSparkBlock(nn.Module):
    """The AllSpark bottleneck on the last encoder stage (the official ``AllSpark`` module).

    Args:
        channels: Width C of the stage-4 map (also the attention width).
        num_classes: K.
        grid: ``(h, w)`` of the stage-4 map of a training crop.
        num_heads: Heads of the unlabeled self-attention (2 in the paper).
        per_image_eval: Inference attends per image (default), so a prediction never depends on the rest of its
            batch; ``False`` restores the official batch-coupled eval (every image attends to the whole batch).
        infer_memory: Inference (eval mode, without unlabeled maps) reads the Semantic Memory, as the labeled
            training stream does after the warm-up, once a training forward has read it (``memory_ready``); before,
            it uses the image's own keys. Needs the memory. ``False`` (official): the image's own keys, always.
        **attn_kwargs: Options of :class:`ChannelCrossAttention` (memory, memory_length, memory_init, attn_dropout,
            grouping, grouping_resize, gather_memory).

    Shape:
        ``forward(feat_l, feat_u)``: ``(B_l, C, h, w)``, ``(B_u, C, h, w)`` -> same shapes.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        grid: tuple[int, int],
        num_heads: int = 2,
        per_image_eval: bool = True,
        infer_memory: bool = False,
        **attn_kwargs: object,
    ) -> None:
        super().__init__()
        self.per_image_eval = per_image_eval
        self.infer_memory = infer_memory
        self.map_in = nn.Sequential(nn.Conv2d(channels, channels, kernel_size=1), nn.GELU())
        self.attn_norm = nn.LayerNorm(channels, eps=1e-6)
        self.attn = ChannelCrossAttention(channels, num_heads, num_classes, grid, **attn_kwargs)  # type: ignore[arg-type]
        self.encoder_norm = nn.LayerNorm(channels, eps=1e-6)
        self.map_out = nn.Sequential(nn.Conv2d(channels, channels, kernel_size=1), nn.GELU())
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        self._ready_seen = False  # host-side copy of memory_ready once it is True (reset by load_state_dict)
        if infer_memory:
            if self.attn.memory is None:
                raise ValueError("infer_memory=True needs the Semantic Memory (memory=True).")
            self.register_buffer("memory_ready", torch.zeros((), dtype=torch.bool))

    @property
    def memory(self) -> SemanticMemory | None:
        """The Semantic Memory, or None when the block has none."""
        return self.attn.memory

    def reads_memory_at_inference(self) -> bool:
        """Whether an eval-mode forward reads the Semantic Memory (``infer_memory`` and ``memory_ready`` set).

        The buffer is read on the host until it is found set (during the warm-up: one scalar read per eval
        forward); from then on the answer is remembered, since only loading a state dict can clear the flag.
        """
        if not self.infer_memory:
            return False
        if not self._ready_seen:
            self._ready_seen = bool(self.memory_ready)
        return self._ready_seen

    def _load_from_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load, with the ``memory_ready`` flag optional both ways.

        A state dict written without ``infer_memory`` counts as ready when its memory holds written slots; the flag
        of a state dict written with it is dropped by a block without it. The remembered flag is forgotten.
        """
        key = prefix + "memory_ready"
        self._ready_seen = False
        if self.infer_memory and key not in state_dict:
            filled = state_dict.get(prefix + "attn.memory.filled")
            ready = bool(filled.any()) if filled is not None else False
            state_dict[key] = torch.tensor(ready)
        elif not self.infer_memory and key in state_dict:
            state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(
        self,
        feat_l: torch.Tensor,
        feat_u: torch.Tensor | None = None,
        *,
        guide_logits: torch.Tensor | None = None,
        use_memory: bool = False,
        coupled: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rebuild labeled features from unlabeled ones.

        Args:
            feat_l: Labeled (or, at inference, all) stage-4 maps ``(B_l, C, h, w)``.
            feat_u: Unlabeled maps ``(B_u, C, h, w)``; None for inference or a supervised forward.
            guide_logits: Teacher output for ``feat_u``'s images ``(B_u, K, H, W)``. In training mode it triggers
                the channel grouping and memory update (before the memory is read, as officially).
            use_memory: Take keys/values from the Semantic Memory (after the warm-up). In eval mode with
                ``infer_memory`` the memory is also read once ``memory_ready`` is set.
            coupled: Without ``feat_u``: attend to the whole batch (official eval) rather than per image;
                ``None`` uses ``not per_image_eval``. Irrelevant when the memory is read (keys shared by all images).

        Returns:
            ``(out_l (B_l, C, h, w), out_u (B_u, C, h, w) or None)``.
        """
        b_l, _, h, w = feat_l.shape
        feats = feat_l if feat_u is None else torch.cat([feat_l, feat_u])
        tokens = self.map_in(feats).flatten(2).transpose(1, 2)  # (B, N, C)
        z = self.attn_norm(tokens)
        z_l, z_u = (z, None) if feat_u is None else (z[:b_l], z[b_l:])
        if self.training and z_u is not None and guide_logits is not None and self.attn.memory is not None:
            self.attn.update_memory(z_u, guide_logits, (h, w))
        if self.infer_memory:
            if self.training and use_memory:
                self.memory_ready.fill_(True)  # a device write, no synchronisation
                self._ready_seen = True
            elif not self.training and feat_u is None:
                use_memory = use_memory or self.reads_memory_at_inference()
        if coupled is None:
            coupled = not self.per_image_eval
        y_l, y_u = self.attn(z_l, z_u, use_memory=use_memory, coupled=coupled, grid=(h, w))
        y = y_l if y_u is None else torch.cat([y_l, y_u])
        out = self.encoder_norm(y + tokens)  # residual with the tokens before the pre-norm
        out = self.map_out(out.transpose(1, 2).reshape(out.shape[0], -1, h, w))  # (B, C, h, w)
        return (out, None) if feat_u is None else (out[:b_l], out[b_l:])
