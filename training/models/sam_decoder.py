"""SAM mask decoder: a two-way transformer between output tokens and the image embedding, upscaling, hypernetworks.

Paper: Kirillov et al., "Segment Anything" (ICCV 2023), section 3 and appendix A ("lightweight mask decoder"): the
output tokens (one IoU token, 1 + `num_multimask_outputs` mask tokens, then any prompt tokens) and the image
embedding (plus the dense prompt embedding) pass `depth` two-way blocks (token self-attention, token-to-image
cross-attention, token MLP, image-to-token cross-attention; positional encodings re-added at every attention), a
final token-to-image attention, then the image embedding is upscaled 4x by two transposed convolutions and each mask
token's hypernetwork MLP gives the weights of a dot product with it: one mask per mask token at 4x the embedding grid.
The IoU head predicts each mask's quality from the IoU token.

Module names follow `segment_anything/modeling/mask_decoder.py` and `transformer.py` so released checkpoints load
with one rename (`mlp.lin1/lin2` -> `mlp.fc1/fc2`, our `Mlp`); see `training.weights.sam_decoder`. The positional
encoding of the image grid is SAM's random Fourier features (`PositionEmbeddingRandom` in its prompt encoder), here
`DensePositionEncoding`, since mSAM drops the prompt encoder but the decoder still needs it.

Attention uses `F.scaled_dot_product_attention` unless `training.layers.export_mode.exportable()` is active, then the
explicit softmax(QK^T / sqrt(d)) V.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.layers.export_mode import is_exportable
from training.layers.mlp import Mlp
from training.models.sam_encoder import LayerNorm2d


class DecoderMLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (SAM's `MLP` for hypernetworks and the IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        """
        Args:
            input_dim: input width.
            hidden_dim: width of the hidden layers.
            output_dim: output width.
            num_layers: number of Linear layers (>= 1).
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        widths = [input_dim] + [hidden_dim] * (num_layers - 1)
        outputs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths, outputs, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TokenAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by `downsample_rate` (SAM `Attention`)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        """
        Args:
            embedding_dim: width of the queries, keys and values (and of the output).
            num_heads: attention heads; must divide `embedding_dim // downsample_rate`.
            downsample_rate: inner width is `embedding_dim // downsample_rate`.
        """
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the inner width {self.internal_dim}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)  # B h N d

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))  # B h N d
        if is_exportable():
            attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # B h Nq Nk
            out = attn.softmax(dim=-1) @ v  # B h Nq d
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # B h Nq d
        out = out.transpose(1, 2).reshape(q.shape[0], -1, self.internal_dim)  # B Nq (h d)
        return self.out_proj(out)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention (post-norm each)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        layer_norm_eps: float = 1e-5,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        """
        Args:
            embedding_dim: token and image-embedding width C.
            num_heads: attention heads.
            mlp_dim: hidden width of the token MLP.
            attention_downsample_rate: inner width of the cross-attentions is C / rate.
            skip_first_layer_pe: the first block's self-attention sees the tokens without their positional part and
                replaces (not adds to) them, as in SAM.
            layer_norm_eps: epsilon of the four LayerNorms.
            act_layer: activation of the token MLP.
        """
        super().__init__()
        self.self_attn = TokenAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.cross_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.mlp = Mlp(embedding_dim, mlp_dim, act_layer=act_layer)
        self.norm3 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.norm4 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.cross_attn_image_to_token = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """queries: B Nq C tokens, keys: B Nk C image embedding, with their positional parts -> updated both."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks, then a final token-to-image attention and LayerNorm (SAM `TwoWayTransformer`)."""

    def __init__(
        self,
        *,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        layer_norm_eps: float = 1e-5,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        """
        Args:
            depth: number of two-way blocks.
            embedding_dim: token and image-embedding width C.
            num_heads: attention heads.
            mlp_dim: hidden width of the token MLPs.
            attention_downsample_rate: inner width of the cross-attentions is C / rate.
            layer_norm_eps: epsilon of the blocks' LayerNorms (the final one keeps 1e-5, as in SAM and transformers).
            act_layer: activation of the token MLPs.
        """
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=index == 0,
                layer_norm_eps=layer_norm_eps,
                act_layer=act_layer,
            )
            for index in range(depth)
        )
        self.final_attn_token_to_image = TokenAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            image_embedding: B C h w.
            image_pe: B C h w (or 1 C h w) positional encoding of the grid.
            point_embedding: B N C output (+ prompt) tokens.

        Returns:
            tokens B N C and image embedding B (h w) C after the transformer.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)  # B C h w -> B (h w) C
        key_pe = image_pe.flatten(2).transpose(1, 2)  # B (h w) C
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class DensePositionEncoding(nn.Module):
    """Random Fourier features of pixel-centre coordinates (SAM `PositionEmbeddingRandom`, Tancik et al. 2020).

    The Gaussian matrix is a persistent buffer (`positional_encoding_gaussian_matrix`, 2 x F): loaded from a SAM
    checkpoint, never trained. `pin(h, w)` stores the table of one grid, which `forward` then returns as a constant.
    """

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        """
        Args:
            num_pos_feats: F; the encoding has 2 F channels (sin and cos).
            scale: standard deviation of the random Gaussian matrix at initialisation.
        """
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))
        self.register_buffer("pinned", None, persistent=False)

    def encode(self, coords: Tensor) -> Tensor:
        """... x 2 coordinates in [0, 1] (x, y) -> ... x 2F features."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix  # ... F
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, height: int, width: int) -> Tensor:
        """1 2F h w encoding of an `height` x `width` grid (pixel centres, normalised per axis)."""
        if self.pinned is not None and tuple(self.pinned.shape[-2:]) == (height, width):
            return self.pinned
        matrix = self.positional_encoding_gaussian_matrix
        y = (torch.arange(height, device=matrix.device, dtype=matrix.dtype) + 0.5) / height  # h
        x = (torch.arange(width, device=matrix.device, dtype=matrix.dtype) + 0.5) / width  # w
        grid = torch.stack([x[None, :].expand(height, width), y[:, None].expand(height, width)], dim=-1)  # h w 2
        return self.encode(grid).permute(2, 0, 1).unsqueeze(0)  # h w 2F -> 1 2F h w

    def pin(self, height: int, width: int) -> None:
        """Store the table of an `height` x `width` grid (export: a constant instead of sin/cos on every call)."""
        self.pinned = None
        with torch.no_grad():
            self.pinned = self.forward(height, width).detach().clone()


class SamMaskDecoder(nn.Module):
    """SAM's mask decoder: output tokens + image embedding -> masks at 4x the grid and their predicted IoU."""

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        layer_norm_eps: float = 1e-5,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        """
        Args:
            transformer_dim: width C of the tokens and of the image embedding (256 in every released SAM).
            depth: two-way transformer blocks.
            num_heads: attention heads of the transformer.
            mlp_dim: hidden width of the transformer's token MLPs.
            attention_downsample_rate: inner width of the cross-attentions is C / rate.
            num_multimask_outputs: masks for ambiguous prompts; one more mask token gives the single-mask output.
            iou_head_depth: Linear layers of the IoU head.
            iou_head_hidden_dim: hidden width of the IoU head.
            layer_norm_eps: epsilon of the transformer blocks' LayerNorms (1e-5 in segment_anything; transformers'
                SamMaskDecoderConfig says 1e-6).
            act_layer: activation of the upscaling path.
        """
        super().__init__()
        if transformer_dim % 8:
            raise ValueError(f"transformer_dim {transformer_dim} must be a multiple of 8 (upscaling to C/4, C/8)")
        self.transformer_dim = transformer_dim
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.layer_norm_eps = layer_norm_eps
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.transformer = TwoWayTransformer(
            depth=depth,
            embedding_dim=transformer_dim,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            attention_downsample_rate=attention_downsample_rate,
            layer_norm_eps=layer_norm_eps,
        )
        # Sequential indices 0, 1, 3 are the module names of SAM checkpoints (`output_upscaling.0.weight` ...).
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            act_layer(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            act_layer(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            DecoderMLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = DecoderMLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def output_tokens(self) -> Tensor:
        """The IoU token then the mask tokens: (1 + M) C."""
        return torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)

    def forward_tokens(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        dense_prompt_embeddings: Tensor | None = None,
        sparse_prompt_embeddings: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the two-way transformer once per row of `image_embeddings` (one prompt set per row).

        Args:
            image_embeddings: N C h w, already one row per prompt set (SAM repeats the image per prompt set).
            image_pe: 1 C h w (or N C h w) positional encoding of the grid.
            dense_prompt_embeddings: N C h w (or broadcastable) added to the image embedding; None = nothing added.
            sparse_prompt_embeddings: N S C prompt tokens after the output tokens; None = no prompt token.

        Returns:
            tokens N (1 + M + S) C (IoU token first, then the M mask tokens) and the image embedding N C h w.
        """
        rows, channels, height, width = image_embeddings.shape
        tokens = self.output_tokens().unsqueeze(0).expand(rows, -1, -1)  # N (1+M) C
        if sparse_prompt_embeddings is not None:
            tokens = torch.cat([tokens, sparse_prompt_embeddings.to(tokens.dtype)], dim=1)  # N (1+M+S) C
        src = image_embeddings if dense_prompt_embeddings is None else image_embeddings + dense_prompt_embeddings
        pos = image_pe.expand(rows, -1, -1, -1) if image_pe.shape[0] == 1 else image_pe
        tokens, src = self.transformer(src, pos, tokens)  # N T C, N (h w) C
        return tokens, src.transpose(1, 2).reshape(rows, channels, height, width)

    def predict_masks(self, tokens: Tensor, src: Tensor, mask_indices: Sequence[int] | None = None) -> Tensor:
        """Masks of some mask tokens from `forward_tokens` outputs.

        Args:
            tokens: N T C transformer tokens (IoU token at 0, mask tokens from 1).
            src: N C h w transformed image embedding.
            mask_indices: which mask tokens (0 = the single-mask output); None = all of them.

        Returns:
            N len(mask_indices) 4h 4w mask logits.
        """
        indices = range(self.num_mask_tokens) if mask_indices is None else mask_indices
        upscaled = self.output_upscaling(src)  # N C/8 4h 4w
        rows, channels, height, width = upscaled.shape
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](tokens[:, 1 + i]) for i in indices], dim=1)  # N K C/8
        masks = hyper_in @ upscaled.reshape(rows, channels, height * width)  # N K (4h 4w)
        return masks.reshape(rows, -1, height, width)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor | None,
        dense_prompt_embeddings: Tensor | None,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """SAM's decoder call: masks N K 4h 4w and IoU predictions N K (K = 3 with `multimask_output`, else 1)."""
        tokens, src = self.forward_tokens(image_embeddings, image_pe, dense_prompt_embeddings, sparse_prompt_embeddings)
        masks = self.predict_masks(tokens, src)  # N M 4h 4w
        iou_pred = self.iou_prediction_head(tokens[:, 0])  # N M
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def describe(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this architecture."""
        first = self.transformer.layers[0] if len(self.transformer.layers) else None
        cross = self.transformer.final_attn_token_to_image
        return {
            "transformer_dim": self.transformer_dim,
            "depth": len(self.transformer.layers),
            "num_heads": cross.num_heads,
            "mlp_dim": first.mlp.fc1.out_features if first is not None else None,
            "attention_downsample_rate": self.transformer_dim // cross.internal_dim,
            "num_multimask_outputs": self.num_multimask_outputs,
            "iou_head_depth": len(self.iou_prediction_head.layers),
            "iou_head_hidden_dim": self.iou_prediction_head.layers[0].out_features,
            "layer_norm_eps": self.layer_norm_eps,
        }
