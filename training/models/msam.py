"""mSAM: SAM image encoder (TA-LoRA on qkv, per-task streams) -> per-task no-mask embeddings -> per-task mask decoders.

Paper: Wang, Ye and Zhang, "Task-Aware Low-Rank Adaptation of Segment Anything Model" (shared/papers/ta-lora-sam.md
§3.3, Fig. 2b; our reading in shared/MODEL_NOTES.md §3). The prompt encoder is removed. Task t with C_t output channels
owns C_t trainable "no mask" embeddings E_t (C_t x C, one row per output channel; all tasks together the paper's
sum_t C_t rows, kept per task here so each task owns its rows): its image embedding I_t (C x h x w) plus each row,
broadcast over the grid, gives (I_t + E_t) of C_t x C x h x w, which task t's own copy of SAM's mask decoder turns into
C_t single-mask outputs O_t (C_t x 4h x 4w), i.e. one decoder pass per output channel.

- segmentation: O_t are the class logits, upsampled bilinearly to the input size (B x C_t x H x W).
- classification (our addition; the paper has dense tasks only): the decoder of the activity task runs its two-way
  transformer on its K rows and the output tokens are pooled into logits: for each row the IoU token and the
  single-mask token after the transformer (2C numbers; attention has already pooled the image into them), the K rows
  concatenated (B x 2CK) -> dropout -> Linear -> K logits. The activity decoder's upscaling path, hypernetworks and
  IoU head are unused (the builder freezes them; they stay in checkpoints so the decoder keeps SAM's layout).

Encoder: TA-LoRA on the fused qkv of every block gives each task its own weights, so each task has its own token
stream; all streams run as ONE batched pass stacked task-major on the batch axis, exactly as EndoARSS does with TESLA
(`training.adapters.active_tasks`). Without per-task adapters one stream serves every decoder.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.adapters.tuner import active_tasks, merged_copy
from training.models.multitask import MultiTaskModule
from training.models.sam_decoder import DensePositionEncoding
from training.models.sam_encoder import SamImageEncoder

SINGLE_MASK = 0  # the mask token SAM uses when one output is asked for (multimask_output=False)


class MSAM(MultiTaskModule):
    """Multi-task SAM: one encoder pass for all task streams, then one mask decoder per task."""

    def __init__(
        self,
        *,
        backbone: SamImageEncoder,
        decoders: nn.ModuleDict,
        no_mask_embed: nn.ParameterDict,
        classifiers: nn.ModuleDict,
        task_kinds: dict[str, str],
        pe_layer: DensePositionEncoding,
        per_task_streams: bool = True,
        classifier_dropout: float = 0.0,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ) -> None:
        """
        Args:
            backbone: SAM image encoder (`prepare_tokens`, `blocks`, `neck`), possibly with adapters on its qkv.
            decoders: one SamMaskDecoder per task, keyed by task name; the key order is the stream order.
            no_mask_embed: per task its C_t x C no-mask rows (one per output channel).
            classifiers: per classification task, Linear(2 C K -> K) on the pooled decoder tokens.
            task_kinds: task name -> "classification" | "segmentation".
            pe_layer: random Fourier encoding of the embedding grid (SAM's prompt-encoder `pe_layer`).
            per_task_streams: one token stream per task through the encoder (needed with per-task adapters).
            classifier_dropout: dropout on the pooled tokens before each classifier.
            pixel_mean: RGB mean in 0-255 units; normalisation lives in the model so exported graphs include it.
            pixel_std: RGB std in 0-255 units.
        """
        super().__init__()
        if set(decoders) != set(task_kinds) or set(no_mask_embed) != set(task_kinds):
            raise ValueError(
                f"decoders {sorted(decoders)}, no-mask rows {sorted(no_mask_embed)} and task kinds "
                f"{sorted(task_kinds)} must name the same tasks"
            )
        wanted = {t for t, kind in task_kinds.items() if kind == "classification"}
        if set(classifiers) != wanted:
            raise ValueError(
                f"classifiers {sorted(classifiers)} must be exactly the classification tasks {sorted(wanted)}"
            )
        self.backbone = backbone
        self.decoders = decoders
        self.no_mask_embed = no_mask_embed
        self.classifiers = classifiers
        self.task_kinds = {task: task_kinds[task] for task in decoders}
        self.pe_layer = pe_layer
        self.per_task_streams = per_task_streams
        self.classifier_dropout = nn.Dropout(classifier_dropout)
        self.register_pixel_stats(pixel_mean, pixel_std)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.decoders.keys())

    def forward_features(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-task image embeddings (B C h w, the neck output) from one batched encoder pass."""
        tasks = self.requested_tasks(tasks)
        x = self.normalize(images)  # B 3 H W
        batch = x.shape[0]
        tokens = self.backbone.prepare_tokens(x)  # B h w D
        streams = len(tasks) if self.per_task_streams else 1
        if streams > 1:
            tokens = tokens.repeat(streams, 1, 1, 1)  # (T B) h w D, task-major
        context = active_tasks(self.backbone, tasks) if self.per_task_streams else nullcontext()
        with context:
            for block in self.backbone.blocks:
                tokens = block(tokens)
        embeddings = self.backbone.neck(tokens.permute(0, 3, 1, 2))  # (T B) D h w -> (T B) C h w
        embeddings = embeddings.reshape(streams, batch, *embeddings.shape[1:])  # T B C h w
        return {task: embeddings[i if streams > 1 else 0] for i, task in enumerate(tasks)}

    def forward_head(
        self, task: str, embeddings: Tensor, output_size: tuple[int, int], pre_logits: bool = False
    ) -> Tensor:
        """Task `task`'s logits from its image embedding: B K (classification) or B C_t H W (segmentation).

        `pre_logits` (classification only): the B (R 2C) pooled tokens the classifier reads, after its dropout."""
        rows = self.no_mask_embed[task]  # R C
        batch, channels, height, width = embeddings.shape
        src = embeddings.unsqueeze(1) + rows[None, :, :, None, None]  # B R C h w: (I_t + E_t)
        src = src.reshape(batch * rows.shape[0], channels, height, width)  # (B R) C h w
        decoder = self.decoders[task]
        tokens, src = decoder.forward_tokens(src, self.pe_layer(height, width))  # (B R) (1+M) C, (B R) C h w
        if self.task_kinds[task] == "classification":
            pooled = torch.cat([tokens[:, 0], tokens[:, 1 + SINGLE_MASK]], dim=-1)  # (B R) 2C: IoU + single-mask
            pooled = self.classifier_dropout(pooled.reshape(batch, -1))  # B (R 2C)
            return pooled if pre_logits else self.classifiers[task](pooled)  # B K
        masks = decoder.predict_masks(tokens, src, (SINGLE_MASK,))  # (B R) 1 4h 4w
        masks = masks.reshape(batch, rows.shape[0], *masks.shape[-2:])  # B R 4h 4w
        return F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)  # B R H W

    def forward_with_pre_logits(
        self, images: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Logits per task and pre-logit features (B F) per classification task (see the model protocol)."""
        features = self.forward_features(images, tasks)
        size = (images.shape[-2], images.shape[-1])
        logits: dict[str, Tensor] = {}
        pre: dict[str, Tensor] = {}
        for task, embeddings in features.items():
            if self.task_kinds[task] == "classification":
                pre[task] = self.forward_head(task, embeddings, size, pre_logits=True)  # B F
                logits[task] = self.classifiers[task](pre[task])  # B K
            else:
                logits[task] = self.forward_head(task, embeddings, size)
        return logits, pre

    def task_parameter_names(self) -> dict[str, list[str]]:
        """Parameters of one task only: its decoder, no-mask rows, classifier, and per-task LoRA factors (TESLA).

        TA-LoRA's factors are one tensor set for all tasks (U3 has a row per task), so they count as shared.
        """
        names: dict[str, list[str]] = {task: [] for task in self.tasks}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            owner = parts[1] if parts[0] in ("decoders", "no_mask_embed", "classifiers") else _adapter_task(name)
            if owner in names:
                names[owner].append(name)
        return names

    def inference_copy(self, height: int, width: int) -> MSAM:
        """An eval-mode copy for a fixed `height` x `width` input: adapters merged per task, position tables pinned.

        Every adapter of the encoder is folded into per-task stacked weights (`merged_copy`; a merged model is
        copied as it is), the absolute position table, the relative tables of the global blocks and the decoders'
        grid encoding are stored for this size, so the graph adds constants instead of resampling. The original model
        is untouched.
        """
        grid = self.backbone.grid_size(height, width)
        inference = copy.deepcopy(merged_copy(self))
        inference.backbone.pin_input_size(height, width)
        inference.pe_layer.pin(*grid)
        return inference.requires_grad_(False).eval()


def _adapter_task(name: str) -> str | None:
    """LoRA/TESLA factors live in ParameterDicts keyed by adapter: "...lora_A.<task or 'shared'>"."""
    for key in (".lora_A.", ".lora_B."):
        if key in name:
            return name.split(key, 1)[1].split(".")[0]
    return None
