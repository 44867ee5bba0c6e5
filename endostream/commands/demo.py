"""`endostream demo` (`make demo`): data -> tiny model -> evaluation -> bundle -> serve, on the embedded default."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_WORKDIR = Path("endostream-work")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo", help="the main job on the embedded default: data -> tiny model -> evaluation -> bundle -> serve"
    )
    demo.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where data, run, bundle and results go")
    demo.add_argument("--images", type=int, default=4000, help="generated images (train/val/test 70/15/15)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-serve", action="store_true", help="stop after building the bundle")
    demo.add_argument("--port", type=int, default=8000, help="port of the service (default 8000)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Each step is skipped when its output exists, so a second run goes straight to serving."""
    bundle = args.workdir / "bundle"
    if not (bundle / "manifest.json").is_file():
        from endostream.commands.temporal import demo_temporal
        from export.onnx_export import export_onnx
        from training.jobs.demo import run_demo

        run_demo(args.workdir, images=args.images, seed=args.seed)
        head = demo_temporal(args.workdir)
        export_onnx(args.workdir / "runs" / "tiny" / "best-merged", bundle, overwrite=True, temporal_head=head)
    else:
        logger.info("demo bundle %s exists; delete it to rebuild", bundle)
    if args.no_serve:
        return 0
    from service.server import run_serve
    from service.settings import Settings

    clips = (args.workdir / "data" / "videos").resolve()
    settings = Settings(bundle=bundle, port=args.port, stream_allowlist=[f"file:{clips}/"])
    logger.info("viewer: http://127.0.0.1:%d/  (stream source to try: file:%s/clip_000.mp4)", args.port, clips)
    return run_serve(settings)
