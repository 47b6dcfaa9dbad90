// The public /v1 API from the browser: keys from session storage as headers, errors in plain words.

const API_KEY = "facegate.apiKey";
const ADMIN_KEY = "facegate.adminKey";

export const keys = {
  get api() { return sessionStorage.getItem(API_KEY) || ""; },
  get admin() { return sessionStorage.getItem(ADMIN_KEY) || ""; },
  save(api, admin) {
    for (const [name, value] of [[API_KEY, api], [ADMIN_KEY, admin]]) {
      if (value) sessionStorage.setItem(name, value); else sessionStorage.removeItem(name);
    }
  },
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// method, path (no query string: keys never go in URLs), optional FormData body, admin key too.
export async function call(method, path, { form, admin = false, query } = {}) {
  const headers = {};
  if (keys.api) headers["X-API-Key"] = keys.api;
  if (admin && keys.admin) headers["X-Admin-Key"] = keys.admin;
  const url = query ? `${path}?${new URLSearchParams(query)}` : path;
  let response;
  try {
    response = await fetch(url, { method, headers, body: form, credentials: "omit" });
  } catch {
    throw new ApiError(0, "network", "the server did not answer");
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && body.error) || { code: `http_${response.status}`, message: response.statusText };
    throw new ApiError(response.status, error.code, error.message);
  }
  return body;
}

const SIDES = { image1: "the first photo", image2: "the second photo", image: "the photo" };

// Which photo a server message is about ("image1: no face found" -> "the first photo").
function subject(message) {
  const head = (message || "").split(":")[0].trim();
  if (SIDES[head]) return SIDES[head];
  const enrol = /^image (\d+) \((.*)\)$/.exec(head);
  return enrol ? `photo ${Number(enrol[1]) + 1} (${enrol[2]})` : "the photo";
}

const PLAIN = {
  no_face: (m) => [`No face found in ${subject(m)}`,
    "Use a sharp photo where the face looks at the camera and is not tiny or cut off."],
  multiple_faces: (m) => [`More than one face in ${subject(m)}`,
    "Crop the photo to the one person you mean, or pick a photo of them alone."],
  image_too_large: (m) => [`${cap(subject(m))} is too large`,
    "Scale it down (under 10 MB and 40 megapixels is accepted by default) and try again."],
  request_too_large: () => ["The photos are too large together",
    "Send fewer or smaller photos at once."],
  too_many_images: () => ["Too many photos in one go", "Enrol at most 16 photos at a time."],
  image_undecodable: (m) => [`${cap(subject(m))} is not a readable image`,
    "The file may be damaged or not a picture. Use a JPEG, PNG, WebP or BMP file."],
  unsupported_image_type: (m) => [`${cap(subject(m))} is in a format the server does not take`,
    "Use JPEG, PNG, WebP or BMP (not GIF, TIFF, HEIC or SVG)."],
  missing_api_key: (m) => (/Admin/i.test(m)
    ? ["This needs the admin key", "Open “API keys” at the top and enter the admin key."]
    : ["This server needs an API key", "Open “API keys” at the top and enter your key."]),
  forbidden: (m) => (/Admin/i.test(m)
    ? ["Wrong admin key", "The server refused the admin key. Check it under “API keys” at the top."]
    : ["Wrong API key", "The server refused the key. Check it under “API keys” at the top."]),
  insufficient_scope: () => ["This key may not do that",
    "Its scopes do not cover this action (a verify key never enrols or deletes). Use a key with the right scope."],
  auth_locked_out: () => ["Too many wrong keys from here",
    "The server locked this client out for a minute. Check the key, wait, then retry."],
  rate_limited: () => ["Too many requests with this key", "Wait a moment and try again."],
  storage_full: () => ["The server's disk is full",
    "Nothing was saved. Verify and search still work; ask the operator to free space."],
  duplicate_identity: () => ["That identity id is taken",
    "Choose another id, or delete the existing identity first."],
  unknown_identity: () => ["No such identity", "It may have been deleted. Refresh the list."],
  identity_has_no_templates: () => ["That identity has no photos left",
    "Enrol it again with photos before comparing against it."],
  no_usable_image: () => ["None of the photos could be used",
    "Each photo must show exactly one face. The reasons per photo are below."],
  model_mismatch: () => ["The gallery was made by another model",
    "Re-embed the gallery (facegate gallery reembed) or re-enrol the identities."],
  validation_error: () => ["Something in the form is not right", ""],
  not_ready: () => ["The server is still starting", "Wait a few seconds and try again."],
  network: () => ["Cannot reach the server", "Check that facegate serve is running, then retry."],
};

function cap(text) { return text.charAt(0).toUpperCase() + text.slice(1); }

// {title, advice, detail}: what went wrong in plain words, what to do, and the server's own text.
export function explain(error) {
  const code = error.code || "error";
  const plain = PLAIN[code];
  const [title, advice] = plain ? plain(error.message || "") : ["The request failed", ""];
  return { title, advice, detail: error.message ? `${error.message} (${code})` : code };
}

// Show an error in a role=alert box, or clear it with null.
export function showError(box, error) {
  box.replaceChildren();
  box.hidden = !error;
  if (!error) return;
  const { title, advice, detail } = explain(error);
  if (error.code === "missing_api_key" || error.code === "forbidden") {
    document.getElementById("keys").open = true;  // where the fix is typed
  }
  box.append(el("strong", {}, title));
  if (advice) box.append(el("p", {}, advice));
  box.append(el("p", { class: "muted small" }, `Server said: ${detail}`));
}

// Replace a box's content; null and false children are left out.
export function fill(box, ...children) {
  box.replaceChildren(...children.filter((c) => c != null && c !== false));
}

// A small element builder: el("p", {class: "x"}, "text", child...).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== false && value != null) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c != null && c !== false));
  return node;
}

export const fmt = {
  sim: (x) => (x == null ? "–" : x.toFixed(3)),
  pct: (x) => (x == null ? "–" : `${(100 * x).toFixed(x > 0 && x < 0.01 ? 2 : 1)}%`),
  ms: (x) => `${Math.round(x)} ms`,
  date: (t) => (t ? new Date(t * 1000).toLocaleString() : "–"),
};
