"""Test RTSP server: serves an H.264 MP4 at rtsp://127.0.0.1:PORT/NAME, looping forever, without re-encoding.

Run with the *system* python (`/usr/bin/python3`), which has GStreamer's Python bindings (Debian packages
python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-rtsp, gstreamer1.0-plugins-{good,bad}):

    /usr/bin/python3 tests/service/rtsp_server.py CLIP.mp4 --port 8554 --name cam

The clip is demuxed once into H.264 access units (byte-stream, SPS/PPS before every IDR, so a client can join at
any GOP boundary); an `appsrc` then replays them in a loop at the clip's frame rate, stamped with the pipeline
clock. Replaying from memory is what makes looping seamless: a filesrc ! qtdemux pipeline ends at EOS, and seeking
back resets timestamps, which RTP clients take as a broken stream. Prints `READY <url>` once clients can connect.
Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import signal
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstApp, GstRtspServer  # noqa: E402

CAPS = "video/x-h264,stream-format=byte-stream,alignment=au"


def demux(path: str) -> tuple[list[bytes], float]:
    """Access units of the clip's first video stream, and its frame rate."""
    pipeline = Gst.parse_launch(
        f'filesrc location="{path}" ! qtdemux ! h264parse config-interval=-1 ! {CAPS} ! appsink name=sink sync=false'
    )
    sink = pipeline.get_by_name("sink")
    pipeline.set_state(Gst.State.PLAYING)
    units: list[bytes] = []
    fps = 0.0
    while True:
        sample = sink.emit("pull-sample")
        if sample is None:
            break
        if not fps:
            ok, num, den = sample.get_caps().get_structure(0).get_fraction("framerate")
            fps = num / den if ok and den and num else 0.0
        buf = sample.get_buffer()
        units.append(buf.extract_dup(0, buf.get_size()))
    pipeline.set_state(Gst.State.NULL)
    if not units:
        raise SystemExit(f"no H.264 frames in {path}; transcode it with ffmpeg -c:v libx264 first")
    return units, fps or 30.0


class LoopingFactory(GstRtspServer.RTSPMediaFactory):
    """One shared media per server; each new media replays the clip from its first (IDR) access unit."""

    def __init__(self, units: list[bytes], fps: float) -> None:
        super().__init__()
        self.units, self.period = units, 1.0 / fps
        self.set_shared(True)
        self.set_launch(
            f"( appsrc name=src is-live=true do-timestamp=true format=time caps={CAPS} "
            f"! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
        self.connect("media-configure", self._configure)

    def _configure(self, _factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        src: GstApp.AppSrc = media.get_element().get_child_by_name("src")
        state = {"i": 0, "due": None}

        def need_data(appsrc: GstApp.AppSrc, _length: int) -> None:
            # Runs in the appsrc streaming thread: sleeping here paces the live source at the clip's frame rate.
            now = time.monotonic()
            state["due"] = now if state["due"] is None else max(state["due"] + self.period, now - self.period)
            time.sleep(max(0.0, state["due"] - now))
            data = self.units[state["i"] % len(self.units)]
            state["i"] += 1
            buf = Gst.Buffer.new_wrapped(data)
            buf.duration = int(self.period * Gst.SECOND)
            appsrc.emit("push-buffer", buf)

        src.connect("need-data", need_data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", help="H.264 MP4 file")
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--name", default="stream")
    args = parser.parse_args()
    Gst.init(None)
    units, fps = demux(args.clip)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(f"/{args.name}", LoopingFactory(units, fps))
    if server.attach(None) == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{args.port}; is the port in use?")
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    # The fixture reads this line to know the server is accepting connections.
    print(f"READY rtsp://127.0.0.1:{args.port}/{args.name} fps={fps:g} frames={len(units)}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
