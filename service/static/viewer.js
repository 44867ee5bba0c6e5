// endostream viewer: upload frames or follow a live stream, draw each result (frame + segmentation overlay), and
// show the activity, class presence and latency. Plain ES module, no dependencies and no build step, so the page
// works offline from the service itself. Assistive display only.

const $ = (id) => document.getElementById(id);

const OVERLAY_ALPHA = Math.round(0.45 * 255); // mask tint over the frame; class 0 (background) stays clear
const P50_WINDOW = 30; // frames in the rolling median of the total latency
const FPS_WINDOW_MS = 2000; // results counted for the processed-fps readout
const READY_POLL_MS = 2000;
const TOKEN_KEY = "endostream.token"; // sessionStorage: the token lives as long as the tab
const STAGES = ["decode", "preprocess", "queue", "infer", "postprocess", "encode", "unattributed"];
const TYPES = { jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", bmp: "image/bmp" };
// this page's uploads, for the temporal answer (getRandomValues works on plain http too; randomUUID does not)
const SESSION_ID = `viewer-${Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("")}`;

const state = {
  model: null, // the /model reply
  modelBlocked: false, // /model answered 401: wait for a token instead of polling it again
  palettes: new Map(), // segmentation task -> { classes, colors, lut }
  totals: [], // latency_ms.total of the last P50_WINDOW results
  rendered: 0,
  last: null, // { result, blob, rtt } drawn last, redrawn when the overlay is toggled
  stream: null, // the running stream: { controller, arrivals, frames, dropped, ended }
};

// ---------------------------------------------------------------------------------------------------- requests

class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function withAuth(headers = {}) {
  const value = token();
  return value ? { ...headers, Authorization: `Bearer ${value}` } : headers;
}

/** The service's JSON error body (`{"error": {"code", "message"}}`) as an ApiError; plain text otherwise. */
async function errorFrom(response) {
  let detail = null;
  try {
    detail = (await response.json())?.error ?? null;
  } catch {
    // not JSON (a proxy page, say): fall back to the status line
  }
  let message = detail?.message || `${response.status} ${response.statusText || "error"}`;
  const retry = response.headers.get("Retry-After");
  if (retry) message += ` (retry after ${retry} s)`;
  if (response.status === 401) message += ". Enter the API token at the top of the page.";
  return new ApiError(message, response.status, detail?.code ?? null);
}

async function api(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: withAuth(init.headers) });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`cannot reach the service (${err.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

function showError(context, err) {
  const box = $("error");
  box.textContent = `${context}: ${err.message}`;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---------------------------------------------------------------------------------------------- model, ready

async function loadModel() {
  try {
    const reply = await (await api("/model")).json();
    state.model = reply;
    state.modelBlocked = false;
    const manifest = reply.manifest ?? {};
    $("model-name").textContent = manifest.name ?? "?";
    $("model-version").textContent = reply.version ?? "?";
    const engine = reply.engine;
    const backend = engine ? `${engine.backend} · ${engine.device} · ${engine.precision}` : "loading";
    $("model-backend").textContent = backend;
    buildPalettes(manifest.tasks ?? []);
  } catch (err) {
    state.modelBlocked = err.status === 401;
    showError("Model", err);
  }
}

async function pollReady() {
  let status = "unreachable";
  let detail = "the service does not answer";
  try {
    const body = await (await fetch("/readyz", { cache: "no-store" })).json();
    status = body.status;
    detail = body.detail ?? "";
  } catch {
    // keep "unreachable"
  }
  const labels = { ready: "ready", starting: "warming up", failed: "failed", unreachable: "unreachable" };
  $("ready").dataset.state = status;
  $("ready").title = detail;
  $("ready-text").textContent = labels[status] ?? status;
  if (status === "ready" && !state.modelBlocked && !state.model?.engine) await loadModel();
  setTimeout(pollReady, READY_POLL_MS);
}

// ---------------------------------------------------------------------------------------------------- colours

function fallbackColour(index) {
  // golden-angle hues for a manifest without colours
  const hue = (index * 137.508) % 360;
  const f = (n) => {
    const k = (n + hue / 30) % 12;
    return Math.round(255 * (0.55 - 0.45 * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

function buildPalettes(tasks) {
  state.palettes.clear();
  for (const task of tasks) {
    if (task.kind !== "segmentation") continue;
    const colors = task.classes.map((_, i) => task.colors?.[i] ?? fallbackColour(i));
    const lut = new Uint8ClampedArray(256 * 4); // index -> RGBA; indices without a class stay transparent
    colors.forEach(([r, g, b], i) => {
      if (i > 0) lut.set([r, g, b, OVERLAY_ALPHA], i * 4);
    });
    state.palettes.set(task.name, { classes: task.classes, colors, lut });
  }
  const first = state.palettes.values().next().value;
  $("legend").replaceChildren(
    ...(first?.classes ?? []).slice(1).map((name, i) => swatchItem(name, first.colors[i + 1])),
  );
}

function palette(task) {
  if (!state.palettes.has(task)) {
    // a task the manifest did not describe (or /model not read yet): colour every index so the mask still shows
    const colors = Array.from({ length: 256 }, (_, i) => fallbackColour(i));
    const lut = new Uint8ClampedArray(256 * 4);
    colors.forEach(([r, g, b], i) => {
      if (i > 0) lut.set([r, g, b, OVERLAY_ALPHA], i * 4);
    });
    state.palettes.set(task, { classes: [], colors, lut });
  }
  return state.palettes.get(task);
}

function swatchItem(name, colour, text = "") {
  const item = document.createElement("li");
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.setAttribute("aria-hidden", "true");
  swatch.style.backgroundColor = `rgb(${colour.join(",")})`;
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  item.append(swatch, label);
  if (text) {
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = text;
    item.append(value);
  }
  return item;
}

// ---------------------------------------------------------------------------------------------------- drawing

function makeCanvas() {
  return typeof OffscreenCanvas === "function" ? new OffscreenCanvas(1, 1) : document.createElement("canvas");
}

const canvas = $("view");
const ctx = canvas.getContext("2d");
const maskCanvas = makeCanvas();
const maskCtx = maskCanvas.getContext("2d", { willReadFrequently: true });

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** The index PNG painted in class colours (alpha OVERLAY_ALPHA) on an offscreen canvas, or null without a mask. */
async function maskOverlay(segmentation) {
  if (!segmentation || segmentation.mask_format !== "png" || typeof segmentation.mask !== "string") return null;
  const blob = new Blob([base64Bytes(segmentation.mask)], { type: "image/png" });
  // no colour management or premultiplication: the grey level must stay the class index
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  maskCanvas.width = bitmap.width;
  maskCanvas.height = bitmap.height;
  maskCtx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const image = maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
  const pixels = new Uint32Array(image.data.buffer); // RGBA bytes read as one little-endian word: red is the low byte
  const lut = new Uint32Array(palette(segmentation.task).lut.buffer);
  for (let i = 0; i < pixels.length; i += 1) pixels[i] = lut[pixels[i] & 0xff];
  maskCtx.putImageData(image, 0, 0);
  return maskCanvas;
}

async function render({ result, blob, rtt, redraw = false }) {
  const frame = await createImageBitmap(blob);
  const overlay = $("show-overlay").checked ? await maskOverlay(result.segmentation) : null;
  if (canvas.width !== frame.width || canvas.height !== frame.height) {
    canvas.width = frame.width;
    canvas.height = frame.height;
  }
  ctx.imageSmoothingEnabled = false; // class edges stay crisp when the mask is scaled
  ctx.drawImage(frame, 0, 0);
  frame.close();
  // The mask comes at the model's grid (mask_size=model) and covers the whole frame: stretched onto it with
  // nearest-neighbour sampling, each frame pixel shows the class of the grid cell its centre falls in, as the API
  // documents; smoothing would blend neighbouring classes into colours that belong to no class.
  if (overlay) ctx.drawImage(overlay, 0, 0, canvas.width, canvas.height);
  canvas.hidden = false;
  $("placeholder").hidden = true;
  if (redraw) return; // the overlay toggle: same frame, readouts unchanged
  state.last = { result, blob, rtt };
  state.rendered += 1;
  canvas.dataset.frames = String(state.rendered);
  showResult(result, rtt);
}

// Latest wins: while one frame is being drawn only the newest waiting one is kept, so a fast stream never queues.
let waiting = null;
let drawing = null;

function show(job) {
  waiting = job;
  if (!drawing) drawing = drain();
  return drawing;
}

async function drain() {
  while (waiting) {
    const job = waiting;
    waiting = null;
    try {
      await render(job);
    } catch (err) {
      showError("Display", err);
    }
  }
  drawing = null;
}

// ---------------------------------------------------------------------------------------------------- readouts

const pct = (x) => `${(100 * x).toFixed(1)} %`;
const ms = (x) => (x == null ? "–" : x.toFixed(1));

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function showResult(result, rtt) {
  const activity = result.activity;
  $("activity-label").textContent = activity ? activity.label : "–";
  $("activity-confidence").textContent = activity ? pct(activity.confidence) : "";
  const probabilities = Object.entries(activity?.probabilities ?? {});
  $("probabilities").replaceChildren(...probabilities.map(([name, p]) => bar(name, p, name === activity.label)));
  showTemporal(result.activity_temporal);

  const segmentation = result.segmentation;
  const colours = segmentation ? palette(segmentation.task).colors : [];
  const present = segmentation?.classes ?? [];
  $("classes").replaceChildren(
    ...present.map((c) => swatchItem(c.name, colours[c.index] ?? [0, 0, 0], pct(c.fraction))),
  );

  const latency = result.latency_ms;
  state.totals.push(latency.total);
  if (state.totals.length > P50_WINDOW) state.totals.shift();
  $("latency-total").textContent = ms(latency.total);
  $("latency-p50").textContent = ms(median(state.totals));
  $("latency-window").textContent = String(state.totals.length);
  $("latency-rtt").textContent = ms(rtt);
  $("latency-stages").replaceChildren(
    ...STAGES.map((stage) => stageRow(stage, latency[stage])),
    stageRow("batch size", latency.batch_size, String(latency.batch_size)),
    stageRow("decoded on", null, latency.decoder ?? "cpu"),
  );

  const frame = result.frame;
  const when = frame.timestamp == null ? "" : ` · t = ${frame.timestamp.toFixed(2)} s`;
  const served = `${result.model.name} (${result.model.backend})`;
  $("frame-caption").textContent = `Frame ${frame.id} · ${frame.width}×${frame.height}${when} · ${served}`;
  const classes = present.map((c) => `${c.name} ${pct(c.fraction)}`).join(", ");
  canvas.setAttribute(
    "aria-label",
    `Frame ${frame.width} by ${frame.height} pixels` +
      (activity ? `, activity ${activity.label} (${pct(activity.confidence)})` : "") +
      (result.activity_temporal ? `, over time ${result.activity_temporal.label}` : "") +
      (classes ? `, segmented classes: ${classes}` : ""),
  );
}

/** The temporal head's answer beside the per-frame one; hidden for bundles without a head. */
function showTemporal(temporal) {
  $("activity-temporal").hidden = !temporal;
  if (!temporal) return;
  $("temporal-label").textContent = temporal.label;
  $("temporal-confidence").textContent = pct(temporal.confidence);
  const span = (temporal.context_frames * temporal.frame_interval_s).toFixed(1);
  const steps = `${temporal.context_frames} step${temporal.context_frames === 1 ? "" : "s"}`;
  $("temporal-context").textContent = `${steps} · ${span} s of context (${temporal.method})`;
}

function bar(name, p, best) {
  const item = document.createElement("li");
  if (best) item.className = "best";
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  const track = document.createElement("span");
  track.className = "track";
  track.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${(100 * p).toFixed(1)}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = pct(p);
  item.append(label, track, value);
  return item;
}

function stageRow(stage, value, text = ms(value)) {
  const row = document.createElement("tr");
  const head = document.createElement("th");
  head.scope = "row";
  head.textContent = stage;
  const cell = document.createElement("td");
  cell.textContent = text;
  row.append(head, cell);
  return row;
}

// ---------------------------------------------------------------------------------------------------- uploads

function contentType(file) {
  return file.type || TYPES[file.name.split(".").pop().toLowerCase()] || "application/octet-stream";
}

async function uploadFiles(files) {
  const status = $("upload-status");
  let done = 0;
  for (const [i, file] of files.entries()) {
    status.textContent = `Sending ${file.name} (${i + 1} of ${files.length})…`;
    const started = performance.now();
    try {
      const response = await api("/infer?mask=png", {
        method: "POST",
        body: file,
        // one temporal session per page: uploads get the temporal answer too (ignored without a temporal head)
        headers: { "Content-Type": contentType(file), "X-Session-Id": SESSION_ID },
      });
      const result = await response.json();
      const rtt = performance.now() - started;
      clearError();
      await show({ result, blob: file, rtt });
      done += 1;
    } catch (err) {
      showError(file.name, err);
    }
  }
  status.textContent = `${done} of ${files.length} frame${files.length === 1 ? "" : "s"} processed.`;
}

let uploads = Promise.resolve();

$("files").addEventListener("change", (event) => {
  const files = [...event.target.files];
  event.target.value = ""; // picking the same file again fires another change
  if (files.length) uploads = uploads.then(() => uploadFiles(files));
});

// ---------------------------------------------------------------------------------------------------- streams

/** Complete lines of an NDJSON body as they arrive. */
async function* ndjsonLines(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (line) yield line;
      }
    }
    buffered += decoder.decode();
    if (buffered.trim()) yield buffered.trim();
  } finally {
    reader.releaseLock();
  }
}

function streamStatus(text) {
  $("stream-status").textContent = text;
}

function setStreaming(on) {
  $("start").disabled = on;
  $("stop").disabled = !on;
  $("source").readOnly = on;
  $("max-seconds").readOnly = on;
}

function onStreamLine(stream, line) {
  let message;
  try {
    message = JSON.parse(line);
  } catch {
    streamStatus(`Unreadable line from the service (${line.length} characters).`);
    return;
  }
  if (message.end) {
    stream.ended = true;
    const { reason, frames } = message.end;
    let text = `Ended (${reason}) after ${frames} frame${frames === 1 ? "" : "s"}.`;
    if (message.error) {
      text += ` Error: ${message.error.message}`;
      showError("Stream", message.error);
    }
    streamStatus(text);
    return;
  }
  if (message.error) {
    const where = message.frame?.id == null ? "" : ` (frame ${message.frame.id})`;
    streamStatus(`Error${where}: ${message.error.message}`);
    return;
  }
  const now = performance.now();
  stream.arrivals.push(now);
  while (stream.arrivals.length > 2 && now - stream.arrivals[0] > FPS_WINDOW_MS) stream.arrivals.shift();
  stream.frames += 1;
  stream.dropped += message.frame.dropped_before ?? 0;
  const span = (stream.arrivals.at(-1) - stream.arrivals[0]) / 1000;
  const fps = stream.arrivals.length > 1 && span > 0 ? (stream.arrivals.length - 1) / span : null;
  $("stream-fps").textContent = fps == null ? "–" : fps.toFixed(1);
  $("stream-frames").textContent = String(stream.frames);
  $("stream-dropped").textContent = String(stream.dropped);
  if (message.frame.frame_jpeg) {
    const blob = new Blob([base64Bytes(message.frame.frame_jpeg)], { type: "image/jpeg" });
    show({ result: message, blob, rtt: null });
  } else {
    showResult(message, null); // an older service without include_frame: readouts only
  }
}

async function startStream(source, maxSeconds) {
  const request = { source, include_frame: true };
  if (maxSeconds > 0) request.max_seconds = maxSeconds;
  const stream = { controller: new AbortController(), arrivals: [], frames: 0, dropped: 0, ended: false };
  state.stream = stream;
  setStreaming(true);
  clearError();
  $("stream-fps").textContent = "–";
  $("stream-frames").textContent = "0";
  $("stream-dropped").textContent = "0";
  streamStatus(`Connecting to ${source}…`);
  try {
    const response = await api("/infer?mask=png", {
      method: "POST",
      body: JSON.stringify(request),
      headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
      signal: stream.controller.signal,
    });
    streamStatus(`Streaming ${source}`);
    for await (const line of ndjsonLines(response.body)) onStreamLine(stream, line);
    if (!stream.ended) streamStatus(`The connection closed after ${stream.frames} frames without an end line.`);
  } catch (err) {
    if (err.name === "AbortError") {
      streamStatus(`Stopped after ${stream.frames} frame${stream.frames === 1 ? "" : "s"}.`);
    } else {
      showError("Stream", err);
      streamStatus(`Failed: ${err.message}`);
    }
  } finally {
    state.stream = null;
    setStreaming(false);
  }
}

$("stream-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.stream) return;
  startStream($("source").value.trim(), parseFloat($("max-seconds").value));
});

// Aborting the fetch closes the connection; the service notices and stops its reader.
$("stop").addEventListener("click", () => state.stream?.controller.abort());

// ---------------------------------------------------------------------------------------------------- set-up

$("show-overlay").addEventListener("change", () => {
  if (state.last && !waiting) show({ ...state.last, redraw: true });
});

$("token").value = token();
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  clearError();
  state.modelBlocked = false;
  loadModel();
});

pollReady();
