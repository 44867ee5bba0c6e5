"""TensorRT engine building: everything around the TensorRT API on CPU, a real build where TensorRT and a GPU exist."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from endostream.cli import main
from export.manifest import InputSpec, read_manifest
from export.tensorrt import (
    EngineSettings,
    TensorRTUnavailable,
    build_engine,
    configure_builder,
    engine_filename,
    profile_shapes,
    require_tensorrt,
)

SPEC = InputSpec("frames", "NHWC", "uint8", 96, 128, "RGB")
SHA = "ab" * 32


def test_settings_validate_and_default_the_optimum():
    assert EngineSettings(max_batch=8).optimum == 4 and EngineSettings(max_batch=1).optimum == 1
    assert EngineSettings(max_batch=8, opt_batch=2).optimum == 2
    for bad, match in (
        ({"precision": "int4"}, "precision"),
        ({"max_batch": 0}, "max-batch"),
        ({"opt_batch": 9}, "opt_batch"),
        ({"workspace_gb": 0}, "workspace"),
    ):
        with pytest.raises(ValueError, match=match):
            EngineSettings(**bad)


def test_profile_covers_batch_one_to_max_at_the_bundle_size():
    assert profile_shapes(SPEC, EngineSettings(max_batch=16, opt_batch=4)) == (
        (1, 96, 128, 3),
        (4, 96, 128, 3),
        (16, 96, 128, 3),
    )
    with pytest.raises(ValueError, match="NHWC"):
        profile_shapes(InputSpec("frames", "NCHW", "uint8", 96, 128, "RGB"), EngineSettings())


def test_engine_name_changes_with_every_input_of_the_build():
    base = engine_filename(SHA, "90", "10.3.0", EngineSettings())
    assert base == f"model.sm90.trt10.3.0.fp16.b8.{SHA[:16]}.plan"
    others = {
        engine_filename("cd" * 32, "90", "10.3.0", EngineSettings()),
        engine_filename(SHA, "89", "10.3.0", EngineSettings()),
        engine_filename(SHA, "90", "10.4.0", EngineSettings()),
        engine_filename(SHA, "90", "10.3.0", EngineSettings(precision="bf16")),
        engine_filename(SHA, "90", "10.3.0", EngineSettings(max_batch=16)),
    }
    assert base not in others and len(others) == 5


class _Recorder:
    """Stands in for TensorRT builder objects: records the calls configure_builder makes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        def record(*args):
            self.calls.append((name, *args))
            return self

        return record


@pytest.mark.parametrize(
    ("precision", "flags"), [("fp32", []), ("fp16", ["FP16"]), ("bf16", ["BF16"]), ("int8", ["INT8", "FP16"])]
)
def test_builder_configuration(precision: str, flags: list[str]):
    trt = SimpleNamespace(
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8"),
    )
    builder, config = _Recorder(), _Recorder()
    configure_builder(trt, builder, config, SPEC, EngineSettings(precision=precision, max_batch=4, workspace_gb=2))
    assert ("set_memory_pool_limit", "WORKSPACE", 2 << 30) in config.calls
    assert [c[1] for c in config.calls if c[0] == "set_flag"] == flags
    assert ("set_shape", "frames", (1, 96, 128, 3), (2, 96, 128, 3), (4, 96, 128, 3)) in builder.calls
    assert [c[0] for c in config.calls][-1] == "add_optimization_profile"


def test_missing_tensorrt_is_explained(monkeypatch: pytest.MonkeyPatch, endoarss_bundle: Path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on a machine without it
    with pytest.raises(TensorRTUnavailable, match="pip install 'endostream\\[gpu\\]'"):
        require_tensorrt()
    with pytest.raises(TensorRTUnavailable, match="onnxruntime backend"):
        build_engine(endoarss_bundle, EngineSettings())
    assert main(["export", "trt", str(endoarss_bundle), "--fp16"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_precision_must_match_the_bundle(endoarss_bundle: Path):
    with pytest.raises(ValueError, match="export quantize"):
        build_engine(endoarss_bundle, EngineSettings(precision="int8"))


@pytest.mark.gpu
@pytest.mark.trt
def test_real_engine_is_built_once_and_listed(endoarss_bundle: Path, tmp_path: Path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this machine")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(endoarss_bundle, bundle)
    path = build_engine(bundle, EngineSettings(max_batch=4))
    assert path.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert build_engine(bundle, EngineSettings(max_batch=4)) == path and path.stat().st_mtime_ns == mtime
    assert [e["file"] for e in read_manifest(bundle).engines] == [path.name]
