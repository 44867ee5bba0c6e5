#!/bin/sh
# endostream container entrypoint (GPU and CPU images).
#
#   [serve] [FLAGS] (default) make sure a TensorRT engine exists for this GPU, then `endostream serve` on 0.0.0.0
#   anything else   run as given, e.g. `endostream export trt /models/tiny --int8` or `sh`
#
# TensorRT engines only run on the GPU architecture and TensorRT version they were built with, so they are built
# here, on the first start on a box, and kept in the engine cache volume. `endostream export trt` writes the engine
# next to the bundle and lists it in the bundle's manifest, which the service reads; the bundles mount stays
# read-only, so the bundle is copied once into the cache (CACHE/bundles/NAME-SHA16, a few MB without engines) and
# served from there. A later start finds the engine and goes straight to serving. Progress goes to the log.
#
# Environment (all optional): ENDOSTREAM_BUNDLE (default /models/bundle), ENDOSTREAM_ENGINE_CACHE
# (/var/cache/endostream), ENDOSTREAM_BACKEND (auto | tensorrt | onnxruntime | torch), ENDOSTREAM_MAX_BATCH (8),
# ENDOSTREAM_TRT_PRECISION (fp16 | fp32 | bf16 | int8; int8 needs the INT8 bundle), ENDOSTREAM_TRT_WORKSPACE_GB (4),
# ENDOSTREAM_HOST (0.0.0.0), and every other ENDOSTREAM_* setting of the service.
set -eu

log() {
    printf '%s endostream-entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

case "${1:-serve}" in
    serve) if [ "$#" -gt 0 ]; then shift; fi ;;
    -*) ;; # flags for `endostream serve`, e.g. `docker run IMAGE --max-batch 4`
    *) exec "$@" ;;
esac

BUNDLE="${ENDOSTREAM_BUNDLE:-/models/bundle}"
CACHE="${ENDOSTREAM_ENGINE_CACHE:-/var/cache/endostream}"
BACKEND="${ENDOSTREAM_BACKEND:-auto}"
PRECISION="${ENDOSTREAM_TRT_PRECISION:-fp16}"
MAX_BATCH="${ENDOSTREAM_MAX_BATCH:-8}"
WORKSPACE="${ENDOSTREAM_TRT_WORKSPACE_GB:-4}"

if [ ! -f "$BUNDLE/manifest.json" ]; then
    log "no bundle at $BUNDLE (manifest.json missing): mount your bundles folder and set ENDOSTREAM_BUNDLE"
    log "a bundle comes from: endostream export onnx RUN/best-merged --out bundles/NAME"
    exit 2
fi

wants_tensorrt() {
    case "$BACKEND" in
        tensorrt) return 0 ;;
        auto) [ -e /proc/driver/nvidia/version ] && python -c "import tensorrt" 2>/dev/null ;;
        *) return 1 ;;
    esac
}

if wants_tensorrt; then
    key=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["model_sha256"][:16])' "$BUNDLE/manifest.json")
    work="$CACHE/bundles/$(basename "$BUNDLE")-$key"
    if [ ! -f "$work/manifest.json" ]; then
        log "copying bundle $BUNDLE to $work (engines and their manifest entries live in the cache volume)"
        rm -rf "$work.partial"
        mkdir -p "$work.partial"
        cp -R "$BUNDLE"/. "$work.partial"/
        mv "$work.partial" "$work"
    fi
    log "TensorRT engine for this GPU ($PRECISION, batch 1..$MAX_BATCH) in $work: a first build takes minutes"
    started=$(date +%s)
    if endostream export trt "$work" "--$PRECISION" --max-batch "$MAX_BATCH" --workspace "$WORKSPACE"; then
        log "TensorRT engine ready after $(($(date +%s) - started)) s"
        ENDOSTREAM_BUNDLE="$work"
        export ENDOSTREAM_BUNDLE
    elif [ "$BACKEND" = "tensorrt" ]; then
        log "TensorRT engine build failed and ENDOSTREAM_BACKEND=tensorrt: not serving"
        exit 1
    else
        log "TensorRT engine build failed: serving with the next backend that runs here (see the engine log line)"
    fi
fi

exec endostream serve --host "${ENDOSTREAM_HOST:-0.0.0.0}" "$@"
