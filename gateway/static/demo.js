// captionstream demo: upload images, follow all their jobs on one WebSocket.
// Plain ES2020, no build step, no dependencies. Paths are relative to the page, so the
// page works at "/" and "/demo" and behind a path prefix.
"use strict";

const TERMINAL = new Set(["SUCCESS", "FAILURE"]);
const MAX_PARALLEL_UPLOADS = 4;

const cards = new Map(); // job_id -> card element
const following = new Set(); // job ids to follow (sent again after a reconnect)
let socket = null;
let reconnectDelayMs = 500;

function $(selector, root = document) {
  return root.querySelector(selector);
}

// ---- cards ------------------------------------------------------------------------

function newCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  const img = $(".thumb", card);
  img.src = URL.createObjectURL(file);
  img.alt = `${file.name}: waiting for a caption`;
  $(".file-name", card).textContent = file.name;
  card.setAttribute("aria-label", file.name);
  card.dataset.fileName = file.name;
  $("#cards").prepend(card);
  return card;
}

function setStatus(card, status, text = status) {
  const el = $(".status", card);
  el.dataset.status = status;
  el.textContent = text;
  card.dataset.status = status;
}

function setError(card, message) {
  $(".error", card).textContent = message || "";
}

function showState(state) {
  const card = cards.get(state.job_id);
  if (!card) return;
  if (TERMINAL.has(card.dataset.status)) return; // the first terminal state is final
  const attempt = state.attempts > 1 ? ` (attempt ${state.attempts})` : "";
  setStatus(card, state.status, state.status + attempt);
  const caption = state.result && state.result.caption;
  if (caption) {
    $(".caption", card).textContent = caption;
    $(".thumb", card).alt = caption;
    if (state.cache_hit) card.classList.add("cached");
  }
  if (state.status === "RETRY") {
    setError(card, `retrying: ${state.error || "transient failure"}`);
  } else if (state.status === "FAILURE") {
    setError(card, state.error || "captioning failed");
    $(".thumb", card).alt = `${card.dataset.fileName}: captioning failed`;
  } else {
    setError(card, "");
  }
  if (TERMINAL.has(state.status)) following.delete(state.job_id);
}

// ---- one WebSocket for every job ----------------------------------------------------

function setConnection(state, text) {
  const el = $("#connection");
  el.dataset.state = state;
  el.textContent = `Live updates: ${text}`;
}

function apiKey() {
  return $("#api-key").value.trim();
}

function wsUrl() {
  const url = new URL("api/v1/ws", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  // Browsers cannot set headers on a WebSocket: the gateway takes the key as a parameter.
  if (apiKey()) url.searchParams.set("api_key", apiKey());
  return url.href;
}

function sendFollow(ids) {
  if (ids.length && socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ follow: ids }));
  }
}

function follow(jobId) {
  following.add(jobId);
  if (!socket) connect();
  else sendFollow([jobId]);
}

function connect() {
  setConnection("connecting", "connecting…");
  socket = new WebSocket(wsUrl());
  socket.addEventListener("open", () => {
    reconnectDelayMs = 500;
    setConnection("open", "connected");
    // The server answers each follow with the job's current state, so nothing that
    // happened while the socket was down is missed.
    sendFollow([...following]);
  });
  socket.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (message.detail && !message.job_id) {
      setConnection("refused", message.detail);
    } else if (message.detail) {
      const card = cards.get(message.job_id);
      if (card) setError(card, message.detail);
      following.delete(message.job_id);
    } else if (message.job_id && message.status) {
      showState(message);
    }
  });
  socket.addEventListener("close", (event) => {
    socket = null;
    if (event.code === 4401) {
      // Not until the key changes: see the "change" listener of #api-key.
      setConnection("refused", "refused: a valid API key is required");
      return;
    }
    if (following.size === 0) {
      setConnection("idle", "idle (every job has finished)");
      return;
    }
    setConnection("closed", `disconnected, retrying in ${reconnectDelayMs / 1000} s`);
    setTimeout(connect, reconnectDelayMs);
    reconnectDelayMs = Math.min(reconnectDelayMs * 2, 10000);
  });
}

// ---- uploads ----------------------------------------------------------------------

function describeError(response, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    // FastAPI validation errors: [{loc, msg, ...}]
    return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  }
  return `${response.status} ${response.statusText}`.trim();
}

async function upload(file, card) {
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch(new URL("api/v1/upload", document.baseURI), {
      method: "POST",
      body: form,
      headers: apiKey() ? { "X-API-Key": apiKey() } : {},
    });
  } catch (err) {
    setStatus(card, "ERROR", "UPLOAD FAILED");
    setError(card, `could not reach the gateway: ${err.message}`);
    return;
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: describeError falls back to the status line
  }
  if (response.status !== 202 || !body || !body.job_id) {
    setStatus(card, "ERROR", `REJECTED (${response.status})`);
    setError(card, describeError(response, body));
    // Chromium cannot show what the gateway could not decode either: no broken image.
    $(".thumb", card).hidden = true;
    return;
  }
  card.dataset.jobId = body.job_id;
  cards.set(body.job_id, card);
  setStatus(card, body.status);
  follow(body.job_id);
}

async function uploadAll(files) {
  const queue = files.map((file) => [file, newCard(file)]);
  const worker = async () => {
    while (queue.length) {
      const [file, card] = queue.shift();
      await upload(file, card);
    }
  };
  await Promise.all(Array.from({ length: MAX_PARALLEL_UPLOADS }, worker));
}

// ---- picking and dropping -----------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  const input = $("#files");
  const zone = $("#picker");
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = ""; // choosing the same file again is another job
    if (files.length) uploadAll(files);
  });
  zone.addEventListener("submit", (event) => event.preventDefault());
  $("#api-key").addEventListener("change", () => {
    if (!socket && following.size) connect();
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = [...event.dataTransfer.files];
    if (files.length) uploadAll(files);
  });
});
