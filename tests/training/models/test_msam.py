"""mSAM family: the SAM mask decoder against transformers, the official checkpoint layout, the model's shapes, what
trains, merged and inference forms, and a short training run that `endostream eval` then scores.

Reference models are transformers' SamModel from a tiny random config (encoder as in test_sam_encoder; decoder width
16, 2 heads, MLP 32), with every tensor perturbed (`_perturb`) so each one changes the outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers  # dev dependency: the reference implementations of the parity tests

from tests.training.conftest import TINY_OVERRIDES
from tests.training.models.test_sam_encoder import IMAGE, VISION, _official, _perturb
from training.adapters.tuner import adapter_regularization, is_adapter_key
from training.builders.registry import build_model
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import load_config
from training.data.writer import synth_labels
from training.engine.run import train
from training.engine.supervised import task_losses
from training.eval.evaluate import run_evaluation
from training.models.msam import MSAM
from training.models.sam_decoder import DensePositionEncoding, SamMaskDecoder
from training.weights.sam_decoder import (
    load_sam_decoder_weights,
    sam_decoder_filter_fn,
    to_hf_sam_decoder,
    to_sam_decoder_original,
)

pytestmark = pytest.mark.timeout(120)

ATOL = 1e-4
GRID = IMAGE // 16
DECODER = {"hidden_size": 16, "num_attention_heads": 2, "mlp_dim": 32, "iou_head_hidden_dim": 16}
# msam settings that describe the reference decoder (transformers builds its block LayerNorms with eps 1e-6).
MSAM_REFERENCE = [
    "model.msam.num_heads=2",
    "model.msam.mlp_dim=32",
    "model.msam.iou_head_hidden_dim=16",
    "model.msam.layer_norm_eps=1.0e-6",
]
SIZE = 64
SMALL = [
    f"model.image_size=[{SIZE}, {SIZE}]",
    f"model.backbone.overrides={{img_size: [{SIZE}, {SIZE}], patch_size: 8}}",
    "model.msam.mlp_dim=32",
]
# The official layout of the decoder and of mSAM's prompt-encoder tensors, written by hand from the Hugging Face names
# (independent of training.weights.sam_decoder's tables).
HF_DECODER_TO_OFFICIAL = [
    (".layer_norm_final_attn.", ".norm_final_attn."),
    (".layer_norm", ".norm"),
    ("upscale_conv1.", "output_upscaling.0."),
    ("upscale_layer_norm.", "output_upscaling.1."),
    ("upscale_conv2.", "output_upscaling.3."),
]
HF_FEEDFORWARD_TO_OFFICIAL = [(".layers.0.", ".layers.1."), (".proj_in.", ".layers.0."), (".proj_out.", ".layers.2.")]


def _hf_sam(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.SamConfig(
        vision_config={**VISION, "num_pos_feats": DECODER["hidden_size"] // 2},
        prompt_encoder_config={
            "hidden_size": DECODER["hidden_size"],
            "image_embedding_size": GRID,
            "image_size": IMAGE,
        },
        mask_decoder_config=DECODER,
    )
    return _perturb(transformers.SamModel(config))


def _official_sam(hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A whole-SAM state dict in segment_anything's layout: image encoder, prompt encoder, mask decoder."""
    out = {}
    for key, tensor in _official(hf).items():
        if key.startswith("mask_decoder."):
            for old, new in HF_DECODER_TO_OFFICIAL:
                key = key.replace(old, new)
            if ".output_hypernetworks_mlps." in key or ".iou_prediction_head." in key:
                for old, new in HF_FEEDFORWARD_TO_OFFICIAL:
                    key = key.replace(old, new)
        elif key == "shared_image_embedding.positional_embedding":
            key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
        elif key == "prompt_encoder.shared_embedding.positional_embedding":
            continue  # tied to the one above
        out[key] = tensor
    return out


def _decoder_inputs(batch: int = 2, prompts: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    width = DECODER["hidden_size"]
    return (
        torch.randn(batch, width, GRID, GRID),
        torch.randn(batch, width, GRID, GRID),
        torch.randn(batch, prompts, width),
    )


def _compare(ours: SamMaskDecoder, pe: torch.Tensor, hf: torch.nn.Module) -> float:
    """Max |ours - transformers| over masks and IoU predictions, with and without prompt tokens, single/multi mask."""
    image, dense, sparse = _decoder_inputs()
    worst = 0.0
    for tokens in (None, sparse):
        for multimask in (False, True):
            with torch.no_grad():
                want = hf.mask_decoder(image, pe, None if tokens is None else tokens[:, None], dense, multimask)
                got = ours.eval()(image, pe, tokens, dense, multimask)
            for a, b in zip(got, want, strict=True):
                b = b[:, 0]  # drop transformers' point-batch axis
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
                worst = max(worst, (a - b).abs().max().item())
    return worst


def test_decoder_from_hf_directory_matches_transformers(tmp_path: Path) -> None:
    hf = _hf_sam()
    hf.save_pretrained(tmp_path)
    loaded = load_sam_decoder_weights(tmp_path)
    assert loaded.source == "hf_sam" and loaded.arch["num_heads"] == 2 and loaded.arch["layer_norm_eps"] == 1e-6
    ours = SamMaskDecoder(**loaded.arch)
    ours.load_state_dict(loaded.state_dict, strict=True)
    pe_layer = DensePositionEncoding(DECODER["hidden_size"] // 2)
    pe_layer.load_state_dict({"positional_encoding_gaussian_matrix": loaded.positional_encoding})
    with torch.no_grad():
        want_pe = hf.get_image_wide_positional_embeddings()
    torch.testing.assert_close(pe_layer(GRID, GRID), want_pe, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.no_mask_embed, hf.prompt_encoder.no_mask_embed.weight.detach())
    assert _compare(ours, want_pe, hf) <= ATOL


def test_official_layout_and_mirrors(tmp_path: Path) -> None:
    hf = _hf_sam(seed=2)
    official = _official_sam(hf)
    torch.save(official, tmp_path / "sam_vit_t.pth")
    loaded = load_sam_decoder_weights(tmp_path / "sam_vit_t.pth")
    assert loaded.source == "sam" and "num_heads" not in loaded.arch  # not recorded in the official layout
    ours = SamMaskDecoder(**{**loaded.arch, "num_heads": 2, "layer_norm_eps": 1e-6})
    ours.load_state_dict(loaded.state_dict, strict=True)
    with torch.no_grad():
        pe = hf.get_image_wide_positional_embeddings()
    assert _compare(ours, pe, hf) <= ATOL
    # Mirror images: ours -> official / Hugging Face gives back the source tensors under the source names.
    decoder = {k: v for k, v in official.items() if k.startswith("mask_decoder.")}
    mirrored = to_sam_decoder_original(ours.state_dict())
    assert mirrored.keys() == decoder.keys() and all(torch.equal(mirrored[k], decoder[k]) for k in decoder)
    hf_decoder = {k: v for k, v in hf.state_dict().items() if k.startswith("mask_decoder.")}
    mirrored = to_hf_sam_decoder(ours.state_dict())
    assert mirrored.keys() == hf_decoder.keys() and all(torch.equal(mirrored[k], hf_decoder[k]) for k in hf_decoder)
    # Our own layout passes through unchanged; a checkpoint without a decoder says what to pass instead.
    assert sam_decoder_filter_fn(ours.state_dict())[1].keys() == ours.state_dict().keys()
    torch.save({k: v for k, v in official.items() if k.startswith("image_encoder.")}, tmp_path / "encoder.pth")
    assert load_sam_decoder_weights(tmp_path / "encoder.pth", required=False) is None
    with pytest.raises(ValueError, match="holds no SAM mask decoder"):
        load_sam_decoder_weights(tmp_path / "encoder.pth")


def test_msam_from_official_sam_matches_transformers_per_channel(tmp_path: Path) -> None:
    """The whole segmentation path: encoder + (I + E_t row) + decoder single mask, upsampled, for every channel."""
    hf = _hf_sam(seed=3)
    torch.save(_official_sam(hf), tmp_path / "sam.pth")
    cfg = load_config(
        "tiny_msam",
        [
            f"model.image_size=[{IMAGE}, {IMAGE}]",
            f"model.backbone.checkpoint={tmp_path / 'sam.pth'}",
            "model.backbone.freeze=true",
            f"model.backbone.overrides={{img_size: [{IMAGE}, {IMAGE}], patch_size: 16}}",  # the checkpoint's
            *MSAM_REFERENCE,
        ],
    )
    tasks = synth_labels({}).to_dict()["tasks"]
    model = build_model(cfg.model, tasks).eval()
    rows = model.no_mask_embed["segmentation"].detach()
    pretrained = hf.prompt_encoder.no_mask_embed.weight.detach()
    assert 0.01 < (rows - pretrained).std().item() < 0.03  # SAM's no-mask embedding + N(0, 0.02) per row
    torch.manual_seed(4)
    images = torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8)
    with torch.no_grad():
        got = model(images)
        embeddings = hf.get_image_embeddings(model.normalize(images))
        pe = hf.get_image_wide_positional_embeddings()
        for channel, row in enumerate(rows):
            dense = row.reshape(1, -1, 1, 1).expand_as(embeddings)
            masks, _ = hf.mask_decoder(embeddings, pe, None, dense, False)  # B 1 1 4h 4w
            want = F.interpolate(masks[:, 0], size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)[:, 0]
            torch.testing.assert_close(got["segmentation"][:, channel], want, atol=ATOL, rtol=0)
    assert got["activity"].shape == (2, 5)


def _small_model(*overrides: str) -> MSAM:
    torch.manual_seed(0)
    cfg = load_config("tiny_msam", [*SMALL, *overrides])
    return build_model(cfg.model, synth_labels({}).to_dict()["tasks"])


def test_forward_shapes_and_task_subsets() -> None:
    model = _small_model().eval()
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        seg_only = model(images, ["segmentation"])
    assert model.tasks == ("activity", "segmentation") and model.per_task_streams
    assert out["activity"].shape == (3, 5) and out["segmentation"].shape == (3, 8, SIZE, SIZE)
    assert list(seg_only) == ["segmentation"]
    torch.testing.assert_close(seg_only["segmentation"], out["segmentation"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown task"):
        model(images, ["depth"])


@pytest.mark.parametrize("tune_layernorm", [False, True])
def test_only_adapters_decoders_and_embeddings_train(tune_layernorm: bool) -> None:
    model = _small_model("model.backbone.freeze=true", f"model.adapters.tune_layernorm={str(tune_layernorm).lower()}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder = {n for n in trainable if n.startswith("backbone.")}
    layer_norms = {n for n in encoder if ".norm" in n or n.startswith(("backbone.neck.1.", "backbone.neck.3."))}
    assert {n for n in encoder - layer_norms if not is_adapter_key(n)} == set()
    assert bool(layer_norms) == tune_layernorm
    assert {n.split(".")[0] for n in trainable} == {"backbone", "decoders", "no_mask_embed", "classifiers"}
    # Parts a task never uses stay frozen: other hypernetworks and the IoU heads; the activity decoder's upscaling.
    assert not [n for n in trainable if ".iou_prediction_head." in n or ".output_hypernetworks_mlps.1." in n]
    assert not [n for n in trainable if n.startswith("decoders.activity.output_")]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(5)
    batch = {
        "image": torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8),
        "activity": torch.tensor([1, 3]),
        "mask": torch.randint(0, 8, (2, SIZE, SIZE)),
    }
    model.train()
    losses = task_losses(model, model(batch["image"]), batch)
    (sum(losses.values()) + adapter_regularization(model)).backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    base = [k for k in after if k.startswith("backbone.") and k not in trainable]
    assert base and not changed & set(base), "encoder base weights must stay byte-identical"
    assert {k for k in changed if k.startswith("backbone.")} == encoder
    assert {"no_mask_embed.activity", "no_mask_embed.segmentation"} <= changed
    assert "decoders.segmentation.output_upscaling.0.weight" in changed
    assert "decoders.activity.output_upscaling.0.weight" not in changed


def test_merged_checkpoint_and_inference_copy_match(tmp_path: Path) -> None:
    model = _small_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ta_lora_G"):
                param.normal_(0, 0.05)  # the core starts at zero; make every task's update count
    model.eval()
    cfg = load_config("tiny_msam", SMALL)
    labels = synth_labels({}).to_dict()
    save_checkpoint(model, cfg, labels, tmp_path / "best-merged", merged=True)
    merged = load_checkpoint(tmp_path / "best-merged")
    assert merged.merged and not [k for k in merged.model.state_dict() if is_adapter_key(k)]
    torch.manual_seed(6)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    other = torch.randint(0, 256, (2, 3, 48, 80), dtype=torch.uint8)
    with torch.no_grad():
        want, want_other = model(images), model(other)
        single = model.inference_copy(SIZE, SIZE)
        assert not [n for n, _ in single.named_parameters() if is_adapter_key(n)]
        for got in (merged.model.eval()(images), single(images)):
            for task in want:
                torch.testing.assert_close(got[task], want[task], atol=1e-4, rtol=0)
        pinned = merged.model.inference_copy(48, 80)  # position and global relative tables pinned for 48 x 80
        assert pinned.backbone.pos_embed.shape[1:3] == (6, 10) and pinned.pe_layer.pinned.shape[-2:] == (6, 10)
        for task, value in pinned(other).items():
            torch.testing.assert_close(value, want_other[task], atol=1e-4, rtol=0)
    # TESLA/LoRA-style factors are per task; TA-LoRA's one tensor set is shared.
    owned = model.task_parameter_names()
    assert all(n.split(".")[1] == task for task, names in owned.items() for n in names)
    assert not [n for names in owned.values() for n in names if is_adapter_key(n)]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="no SMA"):
        _small_model("model.sma.enabled=true")
    with pytest.raises(ValueError, match="needs a SAM image encoder"):
        _small_model("model.backbone.name=vit_tiny_p8", "model.backbone.overrides={}")
    with pytest.raises(ValueError, match="model.msam needs integer sizes"):
        _small_model("model.msam.depth=0")


def test_decoder_shape_mismatch_names_the_override(tmp_path: Path) -> None:
    torch.save(_official_sam(_hf_sam()), tmp_path / "sam.pth")
    overrides = [
        f"model.msam.decoder_checkpoint={tmp_path / 'sam.pth'}",  # a random-init encoder of the decoder's width
        f"model.backbone.overrides={{out_chans: {DECODER['hidden_size']}}}",
        f"model.image_size=[{IMAGE}, {IMAGE}]",
    ]
    cfg = load_config("tiny_msam", overrides)
    with pytest.raises(ValueError, match="set model.msam.mlp_dim=32 model.msam.iou_head_hidden_dim=16"):
        build_model(cfg.model, synth_labels({}).to_dict()["tasks"])


def test_short_training_run_then_eval(synth_data: Path, tmp_path: Path) -> None:
    overrides = [
        *TINY_OVERRIDES[:1],
        *SMALL[1:],
        *TINY_OVERRIDES[4:],
        "train.batch_size=16",
        "train.epochs=1",
        f"data.root={synth_data}",
    ]
    cfg = load_config("tiny_msam", overrides)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 1
    scores = run_evaluation(tmp_path / "run" / "best-merged", synth_data, split="test", batch_size=16)
    assert scores["meta"]["merged"] and scores["meta"]["images"] > 0
    assert 0.0 <= scores["activity"]["accuracy"] <= 1.0 and 0.0 <= scores["segmentation"]["miou"] <= 1.0
    plain, merged = load_checkpoint(tmp_path / "run" / "best"), load_checkpoint(tmp_path / "run" / "best-merged")
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        a, b = plain.model.eval()(images), merged.model.eval()(images)
    for task in a:
        torch.testing.assert_close(a[task], b[task], atol=1e-4, rtol=1e-4)
