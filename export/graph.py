"""The export-only wrapper: raw frames in, finished per-task results out, everything between in one graph.

The service resizes a frame to the model resolution and hands over the uint8 NHWC RGB array as it is; the graph
does the layout change, scaling and mean/std normalisation (the model's own buffers), runs every task stream in one
batched pass on the per-task stacked weights, and ends in the results the service returns: class probabilities
(softmax) per classification task and a uint8 class-index map per segmentation task. Logits are optional outputs, and
so are the classification heads' pre-logit features (`<task>_features`, B F), which a bundle's temporal head reads.

The model code stays export-agnostic: this module only wraps the inference copy each family makes of itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training.models.protocol import MultiTaskModel

INPUT_NAME = "frames"


@dataclass(frozen=True)
class GraphOutput:
    """One graph output: which task it belongs to and what it holds."""

    name: str
    task: str
    kind: str  # "probabilities" | "class_map" | "logits" | "features"


def graph_outputs(
    model: MultiTaskModel, tasks: Sequence[str] | None = None, logits: bool = False, features: bool = False
) -> list[GraphOutput]:
    """Output names in graph order: `<task>_probs` for classification, `<task>` (class map) for segmentation.

    With the EndoARSS task names this gives `activity_probs` and `segmentation` (plus `<task>_logits` with `logits`,
    then `<task>_features` per classification task with `features`). `tasks` (default: all, in model order) picks
    the tasks the graph computes.
    """
    tasks = select_graph_tasks(model, tasks)
    outputs = []
    for task in tasks:
        if model.task_kinds[task] == "classification":
            outputs.append(GraphOutput(f"{task}_probs", task, "probabilities"))
        else:
            outputs.append(GraphOutput(task, task, "class_map"))
    if logits:
        outputs += [GraphOutput(f"{task}_logits", task, "logits") for task in tasks]
    if features:
        classification = [t for t in tasks if model.task_kinds[t] == "classification"]
        outputs += [GraphOutput(f"{task}_features", task, "features") for task in classification]
    return outputs


def select_graph_tasks(model: MultiTaskModel, tasks: Sequence[str] | None) -> tuple[str, ...]:
    """`tasks` in model order (all when None); unknown or repeated names raise an error naming the known tasks."""
    if tasks is None:
        return model.tasks
    unknown = [t for t in tasks if t not in model.tasks]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks {list(tasks)} must name distinct tasks of this model: {list(model.tasks)}")
    return tuple(t for t in model.tasks if t in tasks)


def prepare_for_export(model: MultiTaskModel, height: int, width: int) -> MultiTaskModel:
    """The family's inference copy of `model` for a fixed input size: adapters folded, training-only parts dropped,
    position tables pinned, eval mode, no gradients (`MultiTaskModel.inference_copy`; `model` is left untouched).

    Args:
        model: a trained model, merged (a `best-merged` checkpoint) or not.
        height: model input height in pixels (a multiple of the patch size).
        width: model input width in pixels.
    """
    return model.inference_copy(height, width).eval().requires_grad_(False)


class BundleGraph(nn.Module):
    """uint8 frames (B H W 3, RGB) -> per-task results, in `graph_outputs` order."""

    def __init__(
        self,
        model: MultiTaskModel,
        *,
        tasks: Sequence[str] | None = None,
        logits: bool = False,
        features: bool = False,
    ) -> None:
        """
        Args:
            model: a merged model in eval mode (see `prepare_for_export`).
            tasks: the tasks to compute (default: all); their streams still run as one batched pass.
            logits: also return the raw logits of every task (after the results).
            features: also return each classification task's pre-logit features (last), from the same pass.
        """
        super().__init__()
        self.model = model
        self.tasks = select_graph_tasks(model, tasks)
        self.outputs = graph_outputs(model, self.tasks, logits, features)
        self.logits = logits
        self.features = features

    def forward(self, frames: Tensor) -> tuple[Tensor, ...]:
        images = frames.permute(0, 3, 1, 2)  # B 3 H W, still uint8: the model scales and normalises
        if self.features:
            raw, pre = self.model.forward_with_pre_logits(images, self.tasks)
        else:
            raw, pre = self.model(images, self.tasks), {}
        results: list[Tensor] = []
        for task in self.tasks:
            if self.model.task_kinds[task] == "classification":
                results.append(raw[task].softmax(dim=1))  # B K
            else:
                results.append(raw[task].argmax(dim=1).to(torch.uint8))  # B H W; < 256 classes (checked on export)
        if self.logits:
            results += [raw[task] for task in self.tasks]
        results += [pre[task] for task in self.tasks if task in pre]  # B F per classification task
        return tuple(results)
