"""Experiment configuration: typed dataclasses built from YAML + CLI overrides.

Resolution order (dinov2 `utils/config.py` pattern): dataclass defaults <- the config file (which may name a
`base:` config it extends) <- `key=value` overrides from the command line. The resolved config is written into
the run folder so every run can be reproduced from its own directory.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class BackboneConfig:
    name: str = field(default="vit_tiny_p8", metadata={"help": "registry name, see training.builders.backbones"})
    checkpoint: str | None = field(default=None, metadata={"help": "DINOv2 .pth or Hugging Face model directory"})
    freeze: bool = field(default=True, metadata={"help": "freeze the base weights (paper); False trains them too"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "constructor kwargs, e.g. depth"})


@dataclass
class SMAConfig:
    enabled: bool = True
    dim: int = 16
    kernel_size: int = 3
    patch_size: tuple[int, int] = (2, 2)
    groups: int = 4


@dataclass
class AdapterSection:
    shared_rank: int = field(default=4, metadata={"help": "LoRA rank shared by all tasks (0 = none)"})
    task_rank: int = field(default=4, metadata={"help": "TESLA rank per task (0 = none: one shared stream)"})
    alpha: float = 4.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv.q", "qkv.v")
    layers: tuple[int, ...] | None = None
    kind: Literal["lora_tesla", "ta_lora"] = field(
        default="lora_tesla", metadata={"help": "lora_tesla: shared LoRA + TESLA; ta_lora: TA-LoRA (Tucker tensor)"}
    )
    ta_lora_ranks: tuple[int, int, int] = field(
        default=(32, 32, 8), metadata={"help": "TA-LoRA (R1, R2, R3) = (p, q, v); paper §4.1 NYUv2: 32, 32, 8"}
    )
    ta_lora_scaling: float = field(default=0.5, metadata={"help": "TA-LoRA: task t adds scaling * its update"})
    orth_weight: float = field(default=1.0, metadata={"help": "lambda of TA-LoRA's orthogonal regulariser"})
    orth_penalty: Literal["norm", "squared"] = field(
        default="squared", metadata={"help": "regulariser gaps: squared (paper eq. 5) or norm (public code)"}
    )
    tune_layernorm: bool = field(default=False, metadata={"help": "also train the backbone's LayerNorms"})


@dataclass
class HeadsConfig:
    segmentation_channels: int = 256
    activity_channels: int = 256
    dropout: float = 0.1
    activity_pool: Literal["avg", "max", "avgmax"] = "avg"
    input_dim: int | None = field(
        default=None, metadata={"help": "1x1 conv from the feature width to this width before each head (None: off)"}
    )


@dataclass
class BDTASection:
    """BDTA + MoTE bypass branch (family `bdta`, shared/papers/bdta-mote.md); ignored by the other families."""

    stages: int = field(default=4, metadata={"help": "BDTA stages, tapped at evenly spaced backbone blocks"})
    blocks: tuple[int, ...] | None = field(default=None, metadata={"help": "explicit block indices (overrides stages)"})
    reduction: int = field(default=4, metadata={"help": "r: the bypass works at width C / r"})
    num_heads: int = field(default=4, metadata={"help": "cross-attention heads at width C / r"})
    ffn_ratio: float = field(default=2.0, metadata={"help": "FFN hidden width after each cross-attention, x C / r"})
    bottleneck_ratio: float = field(default=0.25, metadata={"help": "per-task G2T/T2G bottleneck width, x C / r"})
    mote_dim: int | None = field(default=None, metadata={"help": "MoTE / head input width (None = C / r)"})
    router_ratio: float = field(default=0.25, metadata={"help": "task-router MLP hidden width, x C"})
    noisy_gating: bool = field(default=True, metadata={"help": "router noise in training (never at inference)"})

    def __post_init__(self) -> None:
        if self.reduction < 1 or self.num_heads < 1 or (self.blocks is None and self.stages < 1):
            raise ValueError(
                f"model.bdta needs reduction, num_heads and stages >= 1, got reduction={self.reduction} "
                f"num_heads={self.num_heads} stages={self.stages}"
            )


@dataclass
class TeacherSpec:
    """One frozen SAK teacher: what to build, how it sees the image, which features it gives."""

    name: str = field(metadata={"help": "training.build_backbone name: dinov2_vitb14, clip_vitb16, sam_vitb, ..."})
    checkpoint: str | None = field(default=None, metadata={"help": "weights file or directory (None = random init)"})
    input_size: int = field(default=224, metadata={"help": "longer image side the teacher sees (SAM: 1024)"})
    key: str | None = field(default=None, metadata={"help": "short name in module keys and logs (default: name)"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "constructor kwargs (tiny tests)"})
    levels: tuple[int, ...] | None = field(
        default=None, metadata={"help": "teacher block indices matched to the student levels (None = evenly spaced)"}
    )
    resize: Literal["auto", "keep_aspect", "longest_pad"] = field(
        default="auto", metadata={"help": "longest_pad: SAM's resize + zero pad; auto picks it for sam_* names"}
    )
    norm: bool = field(default=False, metadata={"help": "apply the teacher's final norm to its block outputs"})
    max_grid: int | None = field(
        default=None, metadata={"help": "area-downsample teacher maps to at most this side (smaller cache)"}
    )
    dim: int | None = field(default=None, metadata={"help": "feature width; filled in from the teacher when built"})
    seed: int = field(default=0, metadata={"help": "init seed of a teacher without checkpoint (tests, CPU runs)"})

    def __post_init__(self) -> None:
        self.key = self.key or self.name
        if not self.key or "." in self.key:
            raise ValueError(f"teacher key {self.key!r} must be a non-empty name without '.'")
        if self.input_size < 1 or (self.max_grid is not None and self.max_grid < 1):
            raise ValueError(
                f"teacher {self.key}: input_size={self.input_size} and max_grid={self.max_grid} must be >= 1"
            )
        self.levels = None if self.levels is None else tuple(int(i) for i in self.levels)


@dataclass
class SAKSection:
    """SAK multi-teacher distillation (family `sak`, shared/papers/sak.md); ignored by the other families."""

    stage: int = field(default=2, metadata={"help": "1: distillation only on unlabeled frames; 2: tasks + gamma KD"})
    teachers: tuple[TeacherSpec, ...] = field(default=(), metadata={"help": "frozen teachers (list of TeacherSpec)"})
    levels: tuple[int, ...] | None = field(
        default=None, metadata={"help": "student block indices (None = [L/4, L/2, 3L/4, L])"}
    )
    gamma: float = field(default=1.0, metadata={"help": "weight of the distillation loss in stage 2"})
    tsap_reduction: int = field(default=4, metadata={"help": "TSAP bottleneck: C -> C / r -> C"})
    router: Literal["mor", "sum"] = field(default="mor", metadata={"help": "MoR routers, or a plain sum of experts"})
    stem_expert: bool = field(default=True, metadata={"help": "raw TAS tokens are an expert next to the TSAPs"})
    noisy_gating: bool = field(default=True, metadata={"help": "router noise in training (never at inference)"})
    aligners: bool = field(default=True, metadata={"help": "Linear student -> teacher width (training only)"})
    tas: Literal["full", "lora", "frozen"] = field(
        default="full", metadata={"help": "TAS training: all weights, shared LoRA (model.adapters), or none"}
    )
    cache: bool = field(default=True, metadata={"help": "keep teacher features on disk (teachers run once)"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "teacher feature cache (None = $XDG_CACHE_HOME/endostream/teacher_features)"}
    )
    cache_dtype: Literal["float16", "float32"] = "float16"
    init_from: str | None = field(default=None, metadata={"help": "stage-1 checkpoint folder to start stage 2 from"})
    video_stride: int = field(default=1, metadata={"help": "stage 1: keep every n-th frame of each video"})
    holdout: float = field(default=0.05, metadata={"help": "stage 1: fraction of frames held out for Rep Sim"})

    def __post_init__(self) -> None:
        specs = []
        for spec in self.teachers:
            if isinstance(spec, dict):
                try:
                    spec = TeacherSpec(**spec)
                except TypeError as err:
                    known = [f.name for f in dataclasses.fields(TeacherSpec)]
                    raise ValueError(f"model.sak.teachers entry {spec!r}: {err}; known keys: {known}") from err
            specs.append(spec)
        self.teachers = tuple(specs)
        keys = [spec.key for spec in self.teachers]
        if len(set(keys)) != len(keys):
            raise ValueError(f"model.sak.teachers keys {keys} repeat; give each teacher its own `key`")
        if self.stage not in (1, 2):
            raise ValueError(f"model.sak.stage={self.stage!r} must be 1 (distillation) or 2 (tasks + distillation)")
        if self.gamma < 0 or self.tsap_reduction < 1 or self.video_stride < 1 or not 0.0 <= self.holdout < 1.0:
            raise ValueError(
                f"model.sak needs gamma >= 0, tsap_reduction >= 1, video_stride >= 1 and 0 <= holdout < 1; got "
                f"gamma={self.gamma} tsap_reduction={self.tsap_reduction} video_stride={self.video_stride} "
                f"holdout={self.holdout}"
            )
        self.levels = None if self.levels is None else tuple(int(i) for i in self.levels)


@dataclass
class MSAMSection:
    """mSAM per-task SAM mask decoders (family `msam`, shared/papers/ta-lora-sam.md §3.3); ignored by the others.

    The decoder width is the encoder's `out_chans`; the other fields are SAM's decoder (`segment_anything`
    `build_sam.py`) by default and must match a decoder checkpoint when one is loaded.
    """

    decoder_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "whole-SAM sam_vit_*.pth or Hugging Face SamModel folder for the decoders (None = the backbone "
            "checkpoint when it holds a mask decoder, else random init)"
        },
    )
    depth: int = field(default=2, metadata={"help": "two-way transformer blocks"})
    num_heads: int = field(default=8, metadata={"help": "decoder attention heads"})
    mlp_dim: int = field(default=2048, metadata={"help": "hidden width of the decoder's token MLPs"})
    attention_downsample_rate: int = field(default=2, metadata={"help": "cross-attention inner width = C / rate"})
    num_multimask_outputs: int = field(default=3, metadata={"help": "SAM's extra mask tokens (kept for its layout)"})
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "decoder LayerNorm eps (segment_anything: 1e-5)"})
    no_mask_noise: float = field(
        default=0.02, metadata={"help": "std of the noise added to SAM's no-mask embedding for each channel's row"}
    )
    classifier_dropout: float = field(default=0.0, metadata={"help": "dropout on the pooled activity tokens"})

    def __post_init__(self) -> None:
        sizes = {
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "attention_downsample_rate": self.attention_downsample_rate,
            "iou_head_depth": self.iou_head_depth,
            "iou_head_hidden_dim": self.iou_head_hidden_dim,
            "num_multimask_outputs": self.num_multimask_outputs + 1,
        }
        bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, int | float):
            raise ValueError(
                f"model.msam.layer_norm_eps={self.layer_norm_eps!r} must be a number (YAML reads 1e-6 as text: 1.0e-6)"
            )
        if bad or self.no_mask_noise < 0 or not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(
                f"model.msam needs integer sizes >= 1 (num_multimask_outputs >= 0), no_mask_noise >= 0 and "
                f"0 <= classifier_dropout < 1; got {bad or ''} no_mask_noise={self.no_mask_noise} "
                f"classifier_dropout={self.classifier_dropout}"
            )


@dataclass
class ModelConfig:
    family: Literal["endoarss", "sak", "msam", "bdta"] = field(
        default="endoarss",
        metadata={"help": "model family; training.builders.registry.FAMILIES maps it to a builder"},
    )
    image_size: tuple[int, int] = (128, 128)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sma: SMAConfig = field(default_factory=SMAConfig)
    adapters: AdapterSection = field(default_factory=AdapterSection)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    bdta: BDTASection = field(default_factory=BDTASection)
    sak: SAKSection = field(default_factory=SAKSection)
    msam: MSAMSection = field(default_factory=MSAMSection)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass
class DataConfig:
    root: str | None = field(default=None, metadata={"help": "dataset folder (EndoARSS layout + labels.json)"})
    format: Literal["endoarss", "endovis18"] = "endoarss"
    train_split: str = "train"
    val_split: str = "val"
    hflip: bool = True
    scale: tuple[float, float] = (0.75, 1.0)
    color_jitter: float = 0.2
    blur_prob: float = 0.1
    num_workers: int = 0
    cache: bool = True
    mask_offset: int = field(
        default=0,
        metadata={"help": "endoarss format: subtracted from non-zero mask values (1 = raw MTLESD masks, as the code)"},
    )
    endovis18_segmentation: Literal["instrument", "scene"] = field(
        default="instrument",
        metadata={"help": "endovis18 format: 7 instrument types + background (MTLEndovis) or the 12 scene classes"},
    )
    limit: int | None = field(
        default=None, metadata={"help": "use the first N frames of each split only (small CPU runs; None = all)"}
    )


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: Literal["step", "cosine", "none"] = "cosine"
    step_size: int = 100
    gamma: float = 0.5
    warmup_epochs: int = 0
    grad_clip: float | None = field(
        default=None, metadata={"help": "global grad-norm clip (None = off; no seed paper clips)"}
    )


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16
    seed: int = 0
    weighting: Literal["ew", "weighted", "dbmtl", "stch"] = field(
        default="ew", metadata={"help": "ew: sum of losses; weighted: TA-LoRA eq. 6, sum_t w_t L_t / sum_t w_t"}
    )
    tasks: tuple[str, ...] | None = field(
        default=None, metadata={"help": "train only these tasks, one head each (a single-task baseline); None = all"}
    )
    task_weights: dict[str, float] | None = field(
        default=None, metadata={"help": "w_t per task for `weighted` (missing tasks: 1; None = all 1, the mean)"}
    )
    dbmtl_beta: float = 0.9
    stch_mu: float = 1.0
    stch_warmup_epochs: int = 4
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    eval_batch_size: int = 32
    time_limit_minutes: float | None = field(
        default=None, metadata={"help": "stop after the epoch that crosses this wall-clock budget"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (None = torch default)"})


@dataclass
class ExperimentConfig:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a (partial) dict, converting nested sections and tuples.

    Unknown keys raise ValueError naming the key and the valid ones, so typos in YAML or overrides never pass
    silently.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown config key {path + key!r}; valid keys here: {sorted(fields)}")
        kwargs[key] = _convert(fields[key], value, f"{path}{key}.")
    return cls(**kwargs)


def _convert(f: dataclasses.Field, value: Any, path: str) -> Any:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if dataclasses.is_dataclass(default):
        if not isinstance(value, dict):
            raise ValueError(f"config key {path[:-1]!r} is a section; got {value!r}")
        return from_dict(type(default), value, path)
    if isinstance(value, list) and (isinstance(default, tuple) or "tuple" in str(f.type)):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_config_file(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"config {name_or_path!r} not found: give a path to a .yaml file or one of {available_configs()}"
        )
    if str(path) in seen:
        raise ValueError(f"config inheritance loop: {' -> '.join(seen + (str(path),))}")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_config_file(base, seen + (str(path),)), data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.epochs=3", "model.sma.enabled=false"]` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return nested


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Resolve a shipped config name (e.g. `tiny`) or a YAML path, then apply `key=value` overrides."""
    data = _read_config_file(name_or_path)
    data.setdefault("name", Path(name_or_path).stem)
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(ExperimentConfig, data)


def write_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
