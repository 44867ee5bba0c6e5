"""Engine backends: ONNX Runtime and the torch program agree, `auto` picks what runs here, errors say what to do.

TensorRT needs a GPU to run; everything around it (engine selection from the manifest, dtype mapping, buffer binding
by tensor name against a stand-in execution context, the import errors) is tested here on CPU.
"""

from __future__ import annotations

import ctypes
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from endostream.cli import main
from export.onnx_export import export_onnx, generated_frames
from export.tensorrt import EngineSettings, engine_filename
from service.bundle import load_bundle, sha256_file
from service.engines import available_backends, open_engine, warm_up
from service.engines.base import Engine, EngineOptions, EngineUnavailable
from service.engines.onnxruntime import CPU_EP, CUDA_EP, TENSORRT_EP, choose_providers
from service.engines.tensorrt import (
    TRT_DTYPES,
    BindingCache,
    TensorInfo,
    TensorRTEngine,
    io_tensors,
    select_engine,
    tensor_dtype,
)
from tests.checkpoints import SIZE

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
SHA = "ab" * 32
PROB_TOLERANCE = 1e-4
MASK_AGREEMENT = 0.999


def _compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray], prob_tol: float, mask_agree: float) -> None:
    assert got.keys() == want.keys()
    np.testing.assert_allclose(got["activity_probs"], want["activity_probs"], atol=prob_tol, rtol=0)
    assert got["segmentation"].dtype == want["segmentation"].dtype == np.uint8
    assert (got["segmentation"] == want["segmentation"]).mean() >= mask_agree


# ---------------------------------------------------------------------------------------------- export side (pt2)
def test_manifest_records_the_checked_torch_program(pt2_bundle: Path):
    record = json.loads((pt2_bundle / "manifest.json").read_text())["checks"]["torch_program"]
    assert record["file"] == "model.pt2" and record["sha256"] == sha256_file(pt2_bundle / "model.pt2")
    assert record["outputs"] == ["activity_probs", "segmentation"] and record["torch"] == torch.__version__
    assert record["parity"]["passed"] and record["parity"]["max_prob_diff"] <= PROB_TOLERANCE


def test_reexport_without_the_flag_drops_the_old_program(pt2_bundle: Path, endoarss_ckpt: Path, tmp_path: Path):
    copy = Path(shutil.copytree(pt2_bundle, tmp_path / "bundle"))
    export_onnx(endoarss_ckpt, copy, overwrite=True)
    assert not (copy / "model.pt2").exists()
    assert "torch_program" not in json.loads((copy / "manifest.json").read_text())["checks"]


def test_cli_flag_reaches_the_exporter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture):
    seen: dict[str, Any] = {}

    def fake_export(checkpoint: Path, out: Path, **kwargs: Any) -> Any:
        seen.update(kwargs)
        checks = {"parity": {"max_prob_diff": 0.0, "mask_agreement": 1.0}, "torch_program": {"file": "model.pt2"}}
        manifest = SimpleNamespace(model_file="model.onnx", input=SimpleNamespace(height=64, width=64), opset=18)
        return SimpleNamespace(bundle=out, manifest=SimpleNamespace(**vars(manifest), checks=checks), seconds=1.0)

    monkeypatch.setattr("export.onnx_export.export_onnx", fake_export)
    assert main(["export", "onnx", str(tmp_path), "--out", str(tmp_path / "b"), "--torch-program"]) == 0
    assert seen["torch_program"] is True and "model.pt2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ onnxruntime vs torch
@pytest.mark.parametrize("batch", [1, 3])
def test_torch_program_matches_onnxruntime(pt2_bundle: Path, batch: int):
    bundle = load_bundle(pt2_bundle)
    frames = generated_frames(batch, SIZE, SIZE, seed=11)
    ort = open_engine(bundle, "onnxruntime", EngineOptions(device="cpu", threads=1))
    program = open_engine(bundle, "torch", EngineOptions(device="cpu"))
    got, want = program.run(frames), ort.run(frames)
    assert want["activity_probs"].shape == (batch, 5) and want["activity_probs"].dtype == np.float32
    assert want["segmentation"].shape == (batch, SIZE, SIZE)
    _compare(got, want, PROB_TOLERANCE, MASK_AGREEMENT)
    ort.close()
    program.close()


def test_engines_describe_what_runs(pt2_bundle: Path):
    bundle = load_bundle(pt2_bundle)
    for backend in ("onnxruntime", "torch"):
        engine = open_engine(bundle, backend, EngineOptions(device="cpu"))
        assert isinstance(engine, Engine)
        assert (engine.backend, engine.device, engine.precision) == (backend, "cpu", "fp32")
        assert engine.output_names == ("activity_probs", "segmentation")
        with pytest.raises(ValueError, match=rf"uint8 B x {SIZE} x {SIZE} x 3.*\(2, 32, 32, 3\)"):
            engine.run(np.zeros((2, 32, 32, 3), np.uint8))
        engine.close()


def test_torch_bf16_on_cpu_stays_close_to_fp32(pt2_bundle: Path):
    bundle = load_bundle(pt2_bundle)
    frames = generated_frames(3, SIZE, SIZE, seed=12)
    fp32 = open_engine(bundle, "torch", EngineOptions(device="cpu")).run(frames)
    engine = open_engine(bundle, "torch", EngineOptions(device="cpu", precision="bf16"))
    assert engine.precision == "bf16"
    got = engine.run(frames)
    assert got["activity_probs"].dtype == np.float32  # numpy has no bf16: outputs come back as float32
    _compare(got, fp32, 2e-2, 0.98)


def test_precast_weights_give_the_same_bf16_results_as_autocast(pt2_bundle: Path):
    """Casting GEMM/conv weights once must be exact: autocast would make the very same copies on every call."""
    from service.engines._torch_precast import precast_gemm_weights

    plain = torch.export.load(str(pt2_bundle / "model.pt2")).module()
    cast = torch.export.load(str(pt2_bundle / "model.pt2")).module()
    assert precast_gemm_weights(cast, torch.bfloat16) > 0
    dtypes = {name: t.dtype for name, t in [*cast.named_parameters(), *cast.named_buffers()]}
    assert any(d == torch.bfloat16 for d in dtypes.values())
    # norms, batch-norm statistics and the pixel mean/std stay float32: autocast keeps those ops in float32
    kept = [n for n in dtypes if "norm" in n or n.endswith(("running_mean", "running_var", "pixel_mean", "pixel_std"))]
    assert len(kept) > 10 and all(dtypes[n] == torch.float32 for n in kept)
    frames = torch.from_numpy(generated_frames(2, SIZE, SIZE, seed=13))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        for want, got in zip(plain(frames), cast(frames), strict=True):
            assert torch.equal(want, got)


def test_torch_engine_takes_tensors_like_numpy(pt2_bundle: Path):
    engine = open_engine(pt2_bundle, "torch", EngineOptions(device="cpu"))
    frames = generated_frames(2, SIZE, SIZE, seed=14)
    want = engine.run(frames)
    _compare(engine.run(torch.from_numpy(frames)), want, 0.0, 1.0)
    single = engine.run(torch.from_numpy(frames[1]))  # H x W x 3: one frame (batch 1 kernels: float rounding)
    _compare(single, {k: v[1:] for k, v in want.items()}, 1e-6, 1.0)
    with pytest.raises(ValueError, match=r"uint8 B x 64 x 64 x 3.*torch.float32 \(1, 64, 64, 3\) on cpu"):
        engine.run(torch.zeros((1, SIZE, SIZE, 3)))
    with pytest.raises(ValueError, match="batch 0"):
        engine.run(torch.zeros((0, SIZE, SIZE, 3), dtype=torch.uint8))


def test_unknown_compile_mode_is_refused(pt2_bundle: Path):
    with pytest.raises(ValueError, match=r"compile mode 'fast' is not one of \['off', 'default', 'max-autotune'\]"):
        open_engine(pt2_bundle, "torch", EngineOptions(device="cpu", compile="fast"))  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_program_matches_eager_on_cpu(pt2_bundle: Path):
    """torch.compile (Inductor C++ codegen, frozen weights) on CPU: one compile, about 1-2 min on 2 cores."""
    bundle = load_bundle(pt2_bundle)
    frames = generated_frames(1, SIZE, SIZE, seed=15)
    eager = open_engine(bundle, "torch", EngineOptions(device="cpu")).run(frames)
    engine = open_engine(bundle, "torch", EngineOptions(device="cpu", compile="default"))
    assert engine.compile == "default"
    _compare(engine.run(frames), eager, PROB_TOLERANCE, MASK_AGREEMENT)
    engine.close()


def test_warm_up_runs_every_batch(pt2_bundle: Path):
    calls: list[tuple[int, ...]] = []

    class Recorder:
        def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
            assert frames.dtype == np.uint8 and frames.flags.c_contiguous
            calls.append(frames.shape)
            return {}

    seconds = warm_up(Recorder(), SIZE, SIZE, batches=(1, 4), runs=2)  # type: ignore[arg-type]
    assert set(seconds) == {1, 4}
    assert calls == [(1, SIZE, SIZE, 3)] * 3 + [(4, SIZE, SIZE, 3)] * 3
    engine = open_engine(pt2_bundle, "onnxruntime", EngineOptions(device="cpu"))
    assert warm_up(engine, SIZE, SIZE, batches=(2,), runs=1)[2] > 0


# ----------------------------------------------------------------------------------------------------- auto
def test_auto_picks_onnxruntime_cpu_without_a_gpu(
    pt2_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr("service.engines.nvidia_driver_present", lambda: False)
    with caplog.at_level(logging.INFO, logger="service.engines"):
        engine = open_engine(pt2_bundle)
    assert (engine.backend, engine.device) == ("onnxruntime", "cpu")
    assert "skipping tensorrt (cuda): no NVIDIA driver" in caplog.text
    with pytest.raises(EngineUnavailable, match=r"no backend can run .*onnxruntime \(cpu\): device cuda was asked"):
        open_engine(pt2_bundle, "auto", EngineOptions(device="cuda"))


def test_auto_with_device_cpu_never_tries_cuda(pt2_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("service.engines.nvidia_driver_present", lambda: True)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a CUDA backend was tried with device cpu")

    monkeypatch.setattr("service.engines.tensorrt.TensorRTEngine", refuse)
    engine = open_engine(pt2_bundle, "auto", EngineOptions(device="cpu"))
    assert (engine.backend, engine.device) == ("onnxruntime", "cpu")


def test_available_backends_finds_the_installed_packages():
    found = available_backends()
    assert "onnxruntime" in found and "torch" in found


def test_opening_onnxruntime_imports_no_torch_training_or_export(endoarss_bundle: Path):
    code = f"""
import sys
import numpy as np
from service.engines import open_engine
from service.engines.base import EngineOptions
engine = open_engine({str(endoarss_bundle)!r}, "onnxruntime", EngineOptions(device="cpu"))
engine.run(np.zeros((1, {SIZE}, {SIZE}, 3), np.uint8))
open_engine({str(endoarss_bundle)!r}, "auto", EngineOptions(device="cpu"))
leaked = [m for m in ("torch", "training", "export") if m in sys.modules]
assert not leaked, leaked
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------- errors
def test_torch_without_a_program_says_to_reexport(endoarss_bundle: Path):
    with pytest.raises(EngineUnavailable, match="no model.pt2.*--torch-program"):
        open_engine(endoarss_bundle, "torch")


def test_modified_program_is_refused(pt2_bundle: Path, tmp_path: Path):
    copy = Path(shutil.copytree(pt2_bundle, tmp_path / "bundle"))
    with (copy / "model.pt2").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(EngineUnavailable, match="does not match the sha256.*--torch-program"):
        open_engine(copy, "torch")


def test_unsupported_precisions_name_the_alternatives(pt2_bundle: Path):
    with pytest.raises(EngineUnavailable, match=r"precision 'fp16'.*\['fp32', 'bf16'\]"):
        open_engine(pt2_bundle, "torch", EngineOptions(device="cpu", precision="fp16"))
    with pytest.raises(EngineUnavailable, match="fp32 graph as it is.*export quantize"):
        open_engine(pt2_bundle, "onnxruntime", EngineOptions(device="cpu", precision="int8"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_says_what_to_install(pt2_bundle: Path):
    with pytest.raises(EngineUnavailable, match="sees no CUDA GPU"):
        open_engine(pt2_bundle, "torch", EngineOptions(device="cuda"))
    import onnxruntime

    if CUDA_EP not in onnxruntime.get_available_providers():
        with pytest.raises(EngineUnavailable, match="pip install onnxruntime-gpu"):
            open_engine(pt2_bundle, "onnxruntime", EngineOptions(device="cuda"))


def test_onnxruntime_providers_follow_the_device(tmp_path: Path):
    assert choose_providers("cpu", [CUDA_EP, CPU_EP], "fp32", tmp_path) == ("cpu", [CPU_EP])
    assert choose_providers("auto", [CPU_EP], "fp32", tmp_path) == ("cpu", [CPU_EP])
    assert choose_providers("auto", [CUDA_EP, CPU_EP], "fp32", tmp_path) == ("cuda", [CUDA_EP, CPU_EP])
    device, providers = choose_providers("cuda", [TENSORRT_EP, CUDA_EP, CPU_EP], "fp32", tmp_path)
    assert device == "cuda" and providers[1:] == [CUDA_EP, CPU_EP]
    name, trt_options = providers[0]
    assert name == TENSORRT_EP and trt_options["trt_engine_cache_path"] == str(tmp_path)
    with pytest.raises(EngineUnavailable, match=r"no CUDA provider \(it offers \['CPUExecutionProvider'\]\)"):
        choose_providers("cuda", [CPU_EP], "fp32", tmp_path)


def test_tensorrt_errors_say_what_to_install(pt2_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(EngineUnavailable, match="CUDA GPUs only"):
        open_engine(pt2_bundle, "tensorrt", EngineOptions(device="cpu"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(EngineUnavailable, match=r"pip install 'endostream\[gpu\]'"):
        open_engine(pt2_bundle, "tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(EngineUnavailable, match="TensorRT 8.6.1 is too old"):
        TensorRTEngine(load_bundle(pt2_bundle))
    if not torch.cuda.is_available():
        monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.3.0"))
        with pytest.raises(EngineUnavailable, match="needs a CUDA GPU"):
            TensorRTEngine(load_bundle(pt2_bundle))


# --------------------------------------------------------------------------------------- TensorRT engine choice
def _entry(sm: str = "90", trt: str = "10.3.0", precision: str = "fp16", max_batch: int = 8, sha: str = SHA) -> dict:
    """A manifest entry as `endostream export trt` writes it (file name from the exporter's own naming)."""
    settings = EngineSettings(precision=precision, max_batch=max_batch)
    return {
        "file": engine_filename(sha, sm, trt, settings),
        "sm": sm,
        "tensorrt": trt,
        "seconds": 60.0,
        **asdict(settings),
    }


def _select(entries: list[dict], **keys: Any) -> dict:
    base = {"model_sha256": SHA, "compute_capability": "90", "tensorrt_version": "10.3.0", "max_batch": 8}
    return select_engine(entries, **{**base, **keys})


def test_engine_entry_must_match_gpu_tensorrt_graph_and_precision():
    fits = _entry()
    others = [
        _entry(sm="89"),
        _entry(trt="10.4.0"),
        _entry(sha="cd" * 32),
        _entry(precision="bf16"),
        _entry(max_batch=4),
    ]
    assert _select([*others, fits], precision="fp16") == fits
    with pytest.raises(EngineUnavailable) as err:
        _select(others, precision="fp16")
    message = str(err.value)
    for reason in (
        "built for sm89, this GPU is sm90",
        "built with TensorRT 10.4.0, installed is 10.3.0",
        "built from another graph",
        "precision bf16, asked for fp16",
        "max batch 4 is below the service's max batch 8",
    ):
        assert reason in message
    assert "`endostream export trt BUNDLE --fp16 --max-batch 8`" in message
    with pytest.raises(EngineUnavailable, match="the manifest lists no engine"):
        _select([])


def test_auto_precision_prefers_fp16_then_the_tightest_profile():
    fp32, fp16_big, fp16 = _entry(precision="fp32"), _entry(max_batch=32), _entry(max_batch=8)
    assert _select([fp32, fp16_big, fp16], precision="auto") == fp16
    assert _select([fp32, fp16_big], precision="auto", max_batch=16) == fp16_big
    assert _select([fp32, fp16], precision="fp32") == fp32


def test_tensorrt_dtypes_map_to_torch():
    assert tensor_dtype(SimpleNamespace(name="HALF")) == "float16"
    assert tensor_dtype(SimpleNamespace(name="UINT8")) == "uint8"
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in TRT_DTYPES.values())
    with pytest.raises(EngineUnavailable, match="dtype FP8 is not supported"):
        tensor_dtype(SimpleNamespace(name="FP8"))


# --------------------------------------------------------------------- TensorRT buffers against a stand-in context
FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"))
IO = {"frames": ("input", "UINT8"), "activity_probs": ("output", "FLOAT"), "segmentation": ("output", "UINT8")}


class FakeCudaEngine:
    """The deserialized-engine calls `io_tensors` makes."""

    num_io_tensors = len(IO)

    def get_tensor_name(self, index: int) -> str:
        return list(IO)[index]

    def get_tensor_mode(self, name: str) -> str:
        return IO[name][0]

    def get_tensor_dtype(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=IO[name][1])


class FakeContext:
    """An execution context that, like TensorRT, reads and writes only through the addresses it was given."""

    def __init__(self, max_batch: int = 4) -> None:
        self.max_batch = max_batch
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert name == "frames"
        if not 1 <= shape[0] <= self.max_batch:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        batch = self.shape[0] if self.shape else -1
        return {"activity_probs": (batch, 5), "segmentation": (batch, SIZE, SIZE)}[name]

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def _view(self, name: str, ctype: Any, shape: tuple[int, ...]) -> np.ndarray:
        buffer = (ctype * int(np.prod(shape))).from_address(self.addresses[name])
        return np.ctypeslib.as_array(buffer).reshape(shape)

    def execute(self) -> None:
        batch = self.shape[0]
        frames = self._view("frames", ctypes.c_uint8, self.shape)
        probs = self._view("activity_probs", ctypes.c_float, (batch, 5))
        mask = self._view("segmentation", ctypes.c_uint8, (batch, SIZE, SIZE))
        probs[:] = frames.mean(axis=(1, 2, 3))[:, None]
        mask[:] = frames[..., 0]


def test_buffers_are_bound_by_tensor_name_per_batch_size():
    tensors = io_tensors(FAKE_TRT, FakeCudaEngine())
    assert tensors[0] == TensorInfo("frames", True, "uint8")
    assert [(t.name, t.dtype) for t in tensors[1:]] == [("activity_probs", "float32"), ("segmentation", "uint8")]
    context = FakeContext()
    cache = BindingCache(torch, context, tensors, "frames", (SIZE, SIZE, 3), torch.device("cpu"))
    rng = np.random.default_rng(0)
    for batch in (2, 3, 2, 1, 3):  # switching sizes must rebind shapes and addresses every time
        bindings = cache.get(batch)
        assert context.shape == (batch, SIZE, SIZE, 3)
        assert {n: t.data_ptr() for n, t in bindings.buffers.items()} == context.addresses
        frames = rng.integers(0, 256, size=(batch, SIZE, SIZE, 3), dtype=np.uint8)
        bindings.input.copy_(torch.from_numpy(frames))
        context.execute()
        out = bindings.outputs
        assert out["activity_probs"].dtype == torch.float32 and out["segmentation"].shape == (batch, SIZE, SIZE)
        np.testing.assert_allclose(out["activity_probs"].numpy()[:, 0], frames.mean(axis=(1, 2, 3)), rtol=1e-5)
        np.testing.assert_array_equal(out["segmentation"].numpy(), frames[..., 0])
    with pytest.raises(RuntimeError, match=r"refused input shape \(5, 64, 64, 3\).*--max-batch"):
        cache.get(5)


def test_engine_with_another_input_is_refused():
    tensors = [TensorInfo("images", True, "float32"), TensorInfo("activity_probs", False, "float32")]
    cache = BindingCache(torch, FakeContext(), tensors, "frames", (SIZE, SIZE, 3), torch.device("cpu"))
    with pytest.raises(EngineUnavailable, match=r"engine inputs \['images'\] are not the bundle's single input"):
        cache.get(1)


# --------------------------------------------------------------------------------------------------------- GPU
# Tolerances against fp32 eager on CUDA, per precision: max |probability difference| and share of equal mask pixels.
# fp16 keeps 10 mantissa bits, bf16 7; the tiny random-init model's class scores sit close together, so a mask pixel
# near a boundary may flip: 2 % of pixels is the allowance, as for the exported INT8 graphs' masks.
GPU_TOLERANCE = {"fp32": (1e-3, 0.995), "fp16": (2e-2, 0.98), "bf16": (2e-2, 0.98)}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_compiled_program_with_cuda_graphs_matches_fp32_eager(pt2_bundle: Path, precision: str):
    bundle = load_bundle(pt2_bundle)
    reference = open_engine(bundle, "torch", EngineOptions(device="cuda", cuda_graphs=False))
    options = EngineOptions(device="cuda", precision=precision, max_batch=4, compile="default")
    engine = open_engine(bundle, "torch", options)
    prob_tol, mask_agree = GPU_TOLERANCE[precision]
    for seed, batch in enumerate((1, 3, 1, 2)):  # batch 1 is specialised, 3 and 2 share the dynamic kernels
        frames = generated_frames(batch, SIZE, SIZE, seed=seed)
        _compare(engine.run(frames), reference.run(frames), prob_tol, mask_agree)
    assert engine.cuda_graphs and set(engine._graphs) == {1, 2, 3}  # the compiled code was captured, not eager
    engine.close()
    reference.close()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_tensor_input_stays_on_the_device(pt2_bundle: Path, graphs: bool):
    bundle = load_bundle(pt2_bundle)
    engine = open_engine(bundle, "torch", EngineOptions(device="cuda", precision="fp16", cuda_graphs=graphs))
    frames = generated_frames(3, SIZE, SIZE, seed=21)
    on_device = torch.from_numpy(frames).cuda()
    assert engine._as_tensor(on_device).data_ptr() == on_device.data_ptr()  # no copy, no host round trip
    want = engine.run(frames)
    _compare(engine.run(on_device), want, 0.0, 1.0)
    _compare(engine.run(on_device[0]), {k: v[:1] for k, v in want.items()}, *GPU_TOLERANCE["fp16"])  # batch-1 kernels
    first = engine.run(on_device)
    engine.run(torch.zeros_like(on_device))  # results already returned must not change under later calls
    _compare(first, want, 0.0, 1.0)
    engine.close()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_cuda_graphs_at_each_precision_match_fp32_eager(pt2_bundle: Path, precision: str):
    bundle = load_bundle(pt2_bundle)
    reference = open_engine(bundle, "torch", EngineOptions(device="cuda", cuda_graphs=False))
    engine = open_engine(bundle, "torch", EngineOptions(device="cuda", precision=precision, max_batch=4))
    assert engine.device.startswith("cuda") and engine.precision == precision
    for seed, batch in enumerate((1, 3, 1, 3, 6)):  # replays with new frames, then a batch above max_batch (eager)
        frames = generated_frames(batch, SIZE, SIZE, seed=seed)
        _compare(engine.run(frames), reference.run(frames), *GPU_TOLERANCE[precision])
    assert set(engine._graphs) == {1, 3}  # one capture per batch size up to max_batch
    frames = generated_frames(2, SIZE, SIZE)
    cpu = open_engine(bundle, "onnxruntime", EngineOptions(device="cpu"))
    _compare(reference.run(frames), cpu.run(frames), PROB_TOLERANCE, MASK_AGREEMENT)  # fp32 on CUDA = the graph
    engine.close()
    reference.close()


def test_frame_tensors_are_checked_like_arrays(endoarss_bundle: Path):
    from service.engines._common import check_frame_tensor

    bundle = load_bundle(endoarss_bundle)
    good = torch.zeros((2, SIZE, SIZE, 3), dtype=torch.uint8)
    assert check_frame_tensor(good, bundle) is good
    for bad in (good.float(), good[0], torch.zeros((1, SIZE + 1, SIZE, 3), dtype=torch.uint8), good[:0]):
        with pytest.raises(ValueError, match="frames"):
            check_frame_tensor(bad, bundle)


@pytest.mark.parametrize("spin", [False, True])
def test_onnxruntime_spin_wait_is_a_setting(endoarss_bundle: Path, spin: bool, monkeypatch: pytest.MonkeyPatch):
    import onnxruntime

    seen: dict[str, str] = {}
    real = onnxruntime.SessionOptions

    class Recording(real):  # type: ignore[misc, valid-type]
        def add_session_config_entry(self, key: str, value: str) -> None:
            seen[key] = value
            super().add_session_config_entry(key, value)

    monkeypatch.setattr(onnxruntime, "SessionOptions", Recording)
    engine = open_engine(load_bundle(endoarss_bundle), "onnxruntime", EngineOptions(device="cpu", spin_wait=spin))
    assert seen["session.intra_op.allow_spinning"] == ("1" if spin else "0") and engine.spin_wait is spin
