// tbps search page: plain JavaScript against the JSON API of the same server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, query: "", selected: null };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function checkedCameras() {
  return [...document.querySelectorAll("#cameras input:checked")].map((box) => box.value);
}

function toIso(value) { return value ? (value.length === 16 ? value + ":00" : value) : ""; }

function renderHits(hits, label) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.tabIndex = 0;
    card.dataset.id = hit.id;
    if (hit.person_id !== null && hit.person_id !== undefined) card.dataset.personId = hit.person_id;
    const img = document.createElement("img");
    img.src = `${hit.thumbnail}?h=256`;
    img.alt = hit.name;
    img.loading = "lazy";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `#${hit.rank}  ${hit.score.toFixed(3)}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    // Month-day and time fit the card; the full name and timestamp are in the tooltip.
    meta.textContent = [hit.camera && `cam ${hit.camera}`, hit.timestamp && hit.timestamp.slice(5, 16).replace("T", " ")]
      .filter(Boolean).join(" · ") || hit.name;
    meta.title = hit.name;
    card.title = [hit.name, hit.timestamp].filter(Boolean).join("\n");
    card.append(img, score, meta);
    card.addEventListener("click", () => showDetail(hit, card));
    card.addEventListener("keydown", (event) => { if (event.key === "Enter") showDetail(hit, card); });
    grid.append(card);
  }
  setStatus(hits.length ? `${hits.length} results ${label}` : `no results ${label}`);
}

async function runSearch() {
  const q = $("query").value.trim();
  if (!q) { setStatus("type a description first", true); return; }
  state.query = q;
  const params = new URLSearchParams({ q, k: $("k").value, rerank: $("rerank").value });
  for (const camera of checkedCameras()) params.append("camera", camera);
  if ($("time-from").value) params.set("time_from", toIso($("time-from").value));
  if ($("time-to").value) params.set("time_to", toIso($("time-to").value));
  setStatus("searching…");
  const started = performance.now();
  try {
    const body = await getJSON(`/api/search?${params}`);
    renderHits(body.hits, `for “${q}” in ${Math.round(performance.now() - started)} ms`);
  } catch (error) { setStatus(error.message, true); }
}

async function searchByUpload(file) {
  const form = new FormData();
  form.append("file", file);
  setStatus("searching by image…");
  try {
    const body = await getJSON(`/api/search/image?k=${$("k").value}`, { method: "POST", body: form });
    state.query = "";
    renderHits(body.hits, `like ${file.name}`);
  } catch (error) { setStatus(error.message, true); }
}

async function moreLikeThis() {
  if (!state.selected) return;
  setStatus("finding similar images…");
  try {
    const body = await getJSON(`/api/images/${state.selected.id}/similar?k=${$("k").value}`);
    renderHits(body.hits, `like ${state.selected.name}`);
  } catch (error) { setStatus(error.message, true); }
}

function showDetail(hit, card) {
  state.selected = hit;
  document.querySelectorAll(".hit.selected").forEach((el) => el.classList.remove("selected"));
  card.classList.add("selected");
  $("detail").hidden = false;
  $("detail-title").textContent = hit.name;
  $("detail-image").src = hit.image;
  $("detail-link").href = hit.image;
  const facts = [`score ${hit.score.toFixed(3)}`, hit.camera && `camera ${hit.camera}`,
    hit.timestamp && hit.timestamp.replace("T", " "), hit.width && `${hit.width}×${hit.height} px`];
  $("detail-meta").textContent = facts.filter(Boolean).join(" · ");
  const explanation = $("explanation");
  if (state.query) {
    explanation.hidden = false;
    explanation.previousElementSibling.hidden = false;
    explanation.src = `/api/images/${hit.id}/explain?${new URLSearchParams({ q: state.query })}`;
  } else {
    explanation.hidden = true;
    explanation.previousElementSibling.hidden = true;
  }
}

async function init() {
  try {
    state.info = await getJSON("/api/info");
  } catch (error) { setStatus(`cannot load the index: ${error.message}`, true); return; }
  const info = state.info;
  for (const mode of info.rerank_modes) $("rerank").append(new Option(mode, mode));
  if (info.cameras.length) {
    $("filters").hidden = false;
    $("camera-filter").hidden = false;
    for (const camera of info.cameras) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = camera;
      label.append(box, ` ${camera}`);
      $("cameras").append(label);
    }
  }
  if (info.time_range) {
    $("filters").hidden = false;
    $("time-filter").hidden = false;
  }
  setStatus(`${info.images} images indexed with ${info.method} — type a description and press Enter`);
}

$("search-form").addEventListener("submit", (event) => { event.preventDefault(); runSearch(); });
$("upload").addEventListener("change", (event) => { if (event.target.files[0]) searchByUpload(event.target.files[0]); });
$("more-like-this").addEventListener("click", moreLikeThis);
$("close").addEventListener("click", () => { $("detail").hidden = true; });
init();
