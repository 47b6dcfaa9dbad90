// Enrol and browse: POST /v1/identities (admin key), GET /v1/identities, DELETE /v1/identities/{id}.

import { call, el, explain, fill, fmt, showError } from "./api.js";
import { enableDrop } from "./widgets.js";

const $ = (id) => document.getElementById(id);
// Measured on held-out people (docs/results.md, "Decisions at every scale").
const ENROL_ADVICE = 5;
const ENROL_GAIN = "at the same 1% FAR, a genuine probe is refused 8.6% of the time against 1 photo, 3.4% against 3 and 2.5% against 5 (held-out people).";
const PAGE = 20;
let offset = 0;

function previews() {
  const box = $("enrol-previews");
  box.replaceChildren(...[...$("enrol-images").files].map((file) => {
    const img = el("img", { alt: file.name, class: "thumb" });
    img.src = URL.createObjectURL(file);
    return img;
  }));
}

// Enrolment review's reasons (server/review.py; FACEGATE_ENROL_REVIEW), in plain words.
const REVIEW = {
  face_too_small: "the face is too small",
  extreme_pose: "the face is turned away",
  low_quality: "too poor to recognise reliably",
  identity_conflict: "looks like another enrolled person",
};

function photoReport(images, files) {
  const rows = images.map((item) => {
    const file = files[item.index];
    const thumb = el("img", { alt: "", class: "thumb" });
    if (file) thumb.src = URL.createObjectURL(file);
    const why = item.reason && (REVIEW[item.reason.code] || explain(item.reason).title);
    const outcome = item.accepted
      ? el("span", { class: "ok" }, "accepted")
      : el("span", { class: "bad", "data-reason": item.reason.code }, `rejected: ${why}`);
    const quality = item.face && item.face.quality
      ? el("span", { class: "muted small quality" }, `quality ${fmt.sim(item.face.quality.score)}`) : null;
    return el("li", { class: item.accepted ? "accepted" : "rejected" }, thumb,
      el("span", {}, item.filename || `photo ${item.index + 1}`), outcome, quality,
      item.accepted ? null : el("span", { class: "muted small" }, `server said: ${item.reason.message}`));
  });
  return el("ul", { class: "photo-report", id: "enrol-photos" }, ...rows);
}

async function enrol(event) {
  event.preventDefault();
  const button = $("enrol-submit");
  showError($("enrol-error"), null);
  const files = [...$("enrol-images").files];
  const form = new FormData();
  form.append("name", $("enrol-name").value.trim());
  if ($("enrol-id").value.trim()) form.append("identity_id", $("enrol-id").value.trim());
  for (const file of files) form.append("images", file);
  button.disabled = true;
  button.textContent = "Enrolling…";
  try {
    const result = await call("POST", "/v1/identities", { form, admin: true });
    const accepted = result.images.filter((i) => i.accepted).length;
    fill($("enrol-result"),
      el("p", { class: "decision ok" },
        `Enrolled ${result.identity.identity_id}: ${accepted} of ${result.images.length} photos accepted`),
      el("p", { class: "muted small", id: "enrol-templates" },
        `${result.templates} template${result.templates === 1 ? "" : "s"}: a verify against this identity now decides at ${fmt.sim(result.threshold)}, the threshold that holds FAR ${fmt.pct(result.target_far)} at this count. ` +
        (result.templates < ENROL_ADVICE ? `Add ${ENROL_ADVICE - result.templates} more photo${ENROL_ADVICE - result.templates === 1 ? "" : "s"}: ${ENROL_GAIN}` : ENROL_GAIN)),
      result.review && result.review.mode !== "off" && result.review.advice
        ? el("p", { class: "small", id: "enrol-review" }, `Review (${result.review.mode}): ${result.review.advice}`) : null,
      photoReport(result.images, files));
    $("enrol-result").hidden = false;
    $("enrol-form").reset();
    $("enrol-previews").replaceChildren();
    offset = 0;
    document.dispatchEvent(new Event("gallery-changed"));
    await refresh();
  } catch (error) {
    showError($("enrol-error"), error);
    $("enrol-result").hidden = true;
  } finally {
    button.disabled = false;
    button.textContent = "Enrol";
  }
}

async function remove(identity) {
  if (!window.confirm(`Delete identity ${identity.identity_id} and its ${identity.templates.length} templates?`)) return;
  showError($("list-error"), null);
  try {
    await call("DELETE", `/v1/identities/${encodeURIComponent(identity.identity_id)}`, { admin: true });
    document.dispatchEvent(new Event("gallery-changed"));
    await refresh();
  } catch (error) {
    showError($("list-error"), error);
  }
}

function row(identity) {
  const del = el("button", { type: "button", class: "danger small-button",
    "aria-label": `Delete ${identity.identity_id}` }, "Delete");
  del.addEventListener("click", () => remove(identity));
  return el("tr", { "data-identity": identity.identity_id },
    el("th", { scope: "row" }, identity.identity_id),
    el("td", {}, identity.name || "–"),
    el("td", { class: "num" }, String(identity.templates.length)),
    el("td", {}, fmt.date(identity.created_at)),
    el("td", {}, del));
}

export async function refresh() {
  showError($("list-error"), null);
  try {
    const page = await call("GET", "/v1/identities", { query: { offset, limit: PAGE } });
    $("identity-table").tBodies[0].replaceChildren(...page.identities.map(row));
    const last = Math.min(page.total, offset + page.identities.length);
    $("list-summary").textContent = page.total
      ? `${offset + 1}–${last} of ${page.total} identities`
      : "No identities enrolled yet.";
    $("list-prev").disabled = offset === 0;
    $("list-next").disabled = last >= page.total;
  } catch (error) {
    showError($("list-error"), error);
  }
}

export function initGallery() {
  enableDrop(document.querySelectorAll("#view-gallery .drop"));
  $("enrol-images").addEventListener("change", previews);
  $("enrol-form").addEventListener("submit", enrol);
  $("list-refresh").addEventListener("click", refresh);
  $("list-prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
  $("list-next").addEventListener("click", () => { offset += PAGE; refresh(); });
}
