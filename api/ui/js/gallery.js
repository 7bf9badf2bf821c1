// The gallery (newest first, more as you scroll), text search, find similar, the full-size viewer and delete.

import { call, errorFrom, mediaUrl, pageUrl, postJson, send } from "./api.js";
import { element, formatBytes, showError } from "./dom.js";

const PAGE_SIZE = 48;
const RESULTS = 48;
// the formats browsers show in an <img>; the viewer shows an image of another (TIFF) by its thumbnail, a WebP
const SHOWN = new Set(["image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"]);

const gallery = document.getElementById("gallery");
const status = document.getElementById("gallery-status");
const showAll = document.getElementById("show-all");
const sentinel = document.getElementById("gallery-more");
const viewer = document.getElementById("viewer");
const confirmDelete = document.getElementById("confirm-delete");

let mode = { kind: "all" }; // or {kind: "search", query} or {kind: "similar", image}
let cursor = null;
let more = false;
let loading = false;
let generation = 0; // a new listing or search makes older answers stale
let opened = null; // the image shown in the viewer
const releases = new Map(); // image id -> frees its thumbnail's memory (key mode)
// loads the next page while the end of the gallery is within reach of the view
const nearEnd = new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting) && more && !loading) loadPage();
}, { rootMargin: "600px" });

export function initGallery() {
  document.getElementById("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = document.getElementById("search-query").value.trim();
    if (query) search(query);
  });
  document.getElementById("filters").addEventListener("change", () => rerun());
  showAll.addEventListener("click", () => {
    document.getElementById("search-query").value = "";
    listAll();
  });
  nearEnd.observe(sentinel);
  document.getElementById("viewer-similar").addEventListener("click", () => {
    const image = opened;
    viewer.close();
    similar(image);
  });
  document.getElementById("viewer-delete").addEventListener("click", () => {
    confirmDelete.returnValue = ""; // Escape closes without a value: never the last confirmation's
    confirmDelete.showModal();
  });
  confirmDelete.addEventListener("close", () => {
    if (confirmDelete.returnValue === "delete") remove(opened);
  });
  document.getElementById("viewer-image").addEventListener("error", (event) => {
    if (!viewer.open || !event.currentTarget.getAttribute("src")) return;
    const reason = "This browser cannot show the image: open the original to see it in another program";
    showError(document.getElementById("viewer-error"), new Error(reason));
  });
  viewer.addEventListener("close", () => {
    const image = document.getElementById("viewer-image");
    image.removeAttribute("src");
    opened?.releaseFull?.();
  });
  listAll();
}

/** A freshly indexed image, shown first when the gallery lists everything. */
export function addImage(image) {
  if (mode.kind !== "all" || Object.keys(filters()).length || gallery.querySelector(`[data-id="${image.id}"]`)) return;
  gallery.prepend(card(image));
  setStatus();
}

function reset(newMode) {
  generation++;
  mode = newMode;
  cursor = null;
  more = false;
  for (const release of releases.values()) release();
  releases.clear();
  gallery.replaceChildren();
  showAll.hidden = newMode.kind === "all";
}

/** The filters the user set, as the API names them (empty when none). */
function filters() {
  const form = document.getElementById("search-form").elements;
  const chosen = {};
  if (form.source.value) chosen.source = form.source.value;
  if (form.content_type.value) chosen.content_type = form.content_type.value;
  // dates are the user's own days: from the start of the first to the end of the last
  if (form.created_after.value) chosen.created_after = new Date(`${form.created_after.value}T00:00`).toISOString();
  if (form.created_before.value) {
    const end = new Date(`${form.created_before.value}T00:00`);
    end.setDate(end.getDate() + 1);
    chosen.created_before = end.toISOString();
  }
  return chosen;
}

function rerun() {
  if (mode.kind === "search") search(mode.query);
  else if (mode.kind === "similar") similar(mode.image);
  else listAll();
}

function listAll() {
  reset({ kind: "all" });
  loadPage();
}

async function loadPage() {
  const mine = generation;
  loading = true;
  status.textContent = "Loading…";
  try {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), ...filters() });
    if (cursor) query.set("cursor", cursor);
    const { body, response } = await call(`/v1/images?${query}`);
    if (mine !== generation) return;
    gallery.append(...body.map((image) => card(image)));
    cursor = response.headers.get("X-Next-Cursor");
    more = Boolean(cursor);
    setStatus();
    loading = false;
    if (more) {
      // the observer speaks only when the end moves into or out of reach: a page that left it in reach (a tall
      // window) would be the last one. Observed afresh, it says where the end is now, and so loads the next page.
      nearEnd.unobserve(sentinel);
      nearEnd.observe(sentinel);
    }
  } catch (error) {
    if (mine === generation) status.textContent = `The images could not be listed: ${error.message}`;
  } finally {
    if (mine === generation) loading = false;
  }
}

async function search(query) {
  reset({ kind: "search", query });
  const mine = generation;
  status.textContent = `Searching for “${query}”…`;
  try {
    const chosen = filters();
    const request = { query, limit: RESULTS };
    if (Object.keys(chosen).length) request.filter = chosen;
    const { body } = await postJson("/v1/images/search", request);
    if (mine !== generation) return;
    gallery.append(...body.results.map((hit) => card(hit, hit.score)));
    setStatus();
  } catch (error) {
    if (mine === generation) status.textContent = `The search failed: ${error.message}`;
  }
}

async function similar(image) {
  const label = image.filename || "this image";
  reset({ kind: "similar", image, label });
  const mine = generation;
  status.textContent = `Finding images like ${label}…`;
  try {
    const query = new URLSearchParams({ limit: String(RESULTS), ...filters() });
    const { body } = await call(`/v1/images/${image.id}/similar?${query}`);
    if (mine !== generation) return;
    gallery.append(...body.results.map((hit) => card(hit, hit.score)));
    setStatus();
  } catch (error) {
    if (mine === generation) status.textContent = `Similar images could not be found: ${error.message}`;
  }
}

function setStatus() {
  const count = gallery.children.length;
  const shown = `${count} image${count === 1 ? "" : "s"}`;
  if (mode.kind === "all") {
    const none = Object.keys(filters()).length ? "No images match the filters." : "No images yet: add some.";
    status.textContent = count ? `${shown}, newest first${more ? " (more below)" : ""}` : none;
  } else if (mode.kind === "search") {
    status.textContent = count ? `${shown} for “${mode.query}”, closest first` : `Nothing found for “${mode.query}”.`;
  } else {
    status.textContent = count ? `${shown} like ${mode.label}, closest first` : `No other images like ${mode.label}.`;
  }
}

function describe(image) {
  return image.filename || `image of ${new Date(image.created_at).toLocaleString()}`;
}

function card(image, score = null) {
  const picture = element("img", { alt: describe(image), loading: "lazy", decoding: "async" });
  picture.width = 192;
  picture.height = Math.max(1, Math.round((192 * image.height) / image.width));
  showThumbnail(image, picture);
  const open = element("button", { type: "button", className: "tile", title: `Open ${describe(image)}` }, [picture]);
  open.setAttribute("aria-label", `Open ${describe(image)}`);
  open.addEventListener("click", () => view(image));
  const find = element("button", {
    type: "button",
    className: "quiet small",
    textContent: "Similar",
    title: `Find images similar to ${describe(image)}`,
  });
  find.addEventListener("click", () => similar(image));
  const caption = [find];
  if (score !== null) {
    caption.unshift(element("span", { className: "score", textContent: score.toFixed(3), title: "similarity" }));
  }
  return element("li", { className: "card", data: { id: image.id } }, [
    open,
    element("div", { className: "card-foot" }, caption),
  ]);
}

async function showThumbnail(image, picture) {
  try {
    const { url, release } = await mediaUrl(image.thumbnail_url);
    picture.src = url;
    releases.get(image.id)?.();
    releases.set(image.id, release);
  } catch {
    picture.alt = `${describe(image)} (no preview)`;
  }
}

async function view(image) {
  opened = image;
  const error = document.getElementById("viewer-error");
  showError(error, null);
  document.getElementById("viewer-title").textContent = describe(image);
  document.getElementById("viewer-details").textContent =
    `${image.width} × ${image.height} · ${image.content_type}` +
    (image.size ? ` · ${formatBytes(image.size)}` : "") +
    ` · added ${new Date(image.created_at).toLocaleString()}`;
  const shown = SHOWN.has(image.content_type);
  const note = document.getElementById("viewer-note");
  const format = image.content_type.replace("image/", "").toUpperCase();
  note.textContent = shown
    ? ""
    : `Browsers do not show ${format} images: this is its preview. Open the original to download it.`;
  note.hidden = shown;
  const picture = document.getElementById("viewer-image");
  picture.alt = shown ? describe(image) : `Preview of ${describe(image)}`;
  const original = document.getElementById("viewer-original");
  original.href = pageUrl(image.file_url);
  // an original the browser would not show is saved under its own name
  if (shown) original.removeAttribute("download");
  else original.download = image.filename || "";
  viewer.showModal();
  const held = [];
  const release = () => held.forEach((media) => media.release());
  try {
    const full = await mediaUrl(image.file_url);
    held.push(full);
    const preview = shown ? full : await mediaUrl(image.thumbnail_url);
    if (preview !== full) held.push(preview);
    if (opened !== image) return release();
    picture.src = preview.url;
    original.href = full.url;
    image.releaseFull = release;
  } catch (failure) {
    release();
    showError(error, failure);
  }
}

async function remove(image) {
  const error = document.getElementById("viewer-error");
  try {
    const response = await send(`/v1/images/${image.id}`, { method: "DELETE" });
    if (!response.ok) throw await errorFrom(response);
  } catch (failure) {
    showError(error, failure);
    return;
  }
  viewer.close();
  gallery.querySelector(`[data-id="${image.id}"]`)?.remove();
  releases.get(image.id)?.();
  releases.delete(image.id);
  setStatus();
  status.textContent = `Deleted ${describe(image)}. ${status.textContent}`;
}
