// Calls to this server's API: the API key (kept in this tab only), JSON errors turned into readable messages.

export const config = JSON.parse(document.getElementById("server-config").textContent);

const KEY_ITEM = "ams-api-key";
let askForKey = null; // set by app.js: (reason) => Promise<boolean>, true when a key was entered

export function setKeyPrompt(prompt) {
  askForKey = prompt;
}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function saveKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

/** An error the API answered (its `message` says what to fix), or a network failure. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

export function authHeaders(headers = {}) {
  const key = apiKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

export async function errorFrom(response) {
  let code = "http_" + response.status;
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && typeof body.message === "string") {
      code = body.code || code;
      message = body.message;
    }
  } catch {
    // not the API's JSON error body: keep the status line
  }
  return answered(response.status, code, message, response.headers.get("Retry-After"));
}

/** The ApiError of an answer; a 503's message says when to try again (its Retry-After). */
function answered(status, code, message, retryAfter) {
  const note = status === 503 && retryAfter ? ` (try again in ${retryAfter} s)` : "";
  return new ApiError(status, code, message + note, retryAfter);
}

/** The key was refused or is missing: ask for one and say whether to try again. */
export async function keyRefused(error) {
  if (error.status !== 401 || !askForKey) return false;
  forgetKey();
  return askForKey(error.message);
}

/** fetch() with the key; a 401 asks for a key and tries once more. Returns the Response (ok or not). */
export async function send(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
    } catch (error) {
      throw new ApiError(0, "network", `the server could not be reached (${error.message})`);
    }
    if (response.status === 401 && attempt === 0) {
      const error = await errorFrom(response);
      if (await keyRefused(error)) continue;
      throw error;
    }
    return response;
  }
}

/** JSON with seeds kept whole: they go up to 2^64 - 1, past what a JavaScript number holds exactly. */
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => (key === "seed" && context?.source ? context.source : value));
}

/** A seed typed in the page, sent as the exact integer it is. */
export function seedValue(text) {
  return JSON.rawJSON ? JSON.rawJSON(BigInt(text).toString()) : Number(text);
}

/** A JSON call: the parsed body, or an ApiError with the server's message. */
export async function call(path, options = {}) {
  const response = await send(path, options);
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return { body: null, response };
  return { body: parseJson(await response.text()), response };
}

export function postJson(path, body) {
  return call(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

// paths of this server's API in the links it returns (never those of a bucket's presigned URL: its bucket name or key)
const API_PATHS = ["/v1/images/", "/v1/jobs/", "/v1/files/"];

/**
 * A link the API returned, as this page may load it. The API builds its links on PUBLIC_BASE_URL (or the address a
 * request named), which need not be the address this page was opened at: the page's own rules (its
 * Content-Security-Policy, same-origin fetches) would block such a link, so it is used as a path on this page's
 * server. A bucket's presigned URL (R2) is kept as it is.
 */
export function pageUrl(link) {
  const url = new URL(link, location.href);
  if (url.origin === location.origin || !API_PATHS.some((path) => url.pathname.startsWith(path))) return link;
  return url.pathname + url.search;
}

/**
 * A URL an <img> or <audio> element can load for an API link that redirects to the object. Without keys that is
 * the link itself; with a key the element cannot send it, so the object is fetched here and shown from memory.
 */
export async function mediaUrl(link) {
  if (!config.keys) return { url: pageUrl(link), release() {} };
  const response = await send(pageUrl(link));
  if (!response.ok) throw await errorFrom(response);
  const url = URL.createObjectURL(await response.blob());
  return { url, release: () => URL.revokeObjectURL(url) };
}

/**
 * A multipart upload with progress (fetch cannot report upload progress): resolves with {status, body, headers}.
 * `onProgress(fraction)` is called as the bytes leave.
 */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    const key = apiKey();
    if (key) request.setRequestHeader("Authorization", `Bearer ${key}`);
    request.responseType = "json";
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    };
    request.onload = () => {
      const body = request.response;
      if (request.status >= 200 && request.status < 300) {
        resolve({ status: request.status, body });
        return;
      }
      const message = body && typeof body.message === "string" ? body.message : `${request.status} ${request.statusText}`;
      const code = body?.code || `http_${request.status}`;
      reject(answered(request.status, code, message, request.getResponseHeader("Retry-After")));
    };
    request.onerror = () => reject(new ApiError(0, "network", "the upload was cut off: the server could not be reached"));
    request.send(form);
  });
}
