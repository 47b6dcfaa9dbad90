// Enrol and browse: POST /v1/identities (admin key), GET /v1/identities, DELETE /v1/identities/{id}.

import { call, el, explain, fill, fmt, showError } from "./api.js";
import { enableDrop } from "./widgets.js";

const $ = (id) => document.getElementById(id);
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

function photoReport(images, files) {
  const rows = images.map((item) => {
    const file = files[item.index];
    const thumb = el("img", { alt: "", class: "thumb" });
    if (file) thumb.src = URL.createObjectURL(file);
    const outcome = item.accepted
      ? el("span", { class: "ok" }, "accepted")
      : el("span", { class: "bad" }, `rejected: ${explain(item.reason).title}`);
    return el("li", { class: item.accepted ? "accepted" : "rejected" }, thumb,
      el("span", {}, item.filename || `photo ${item.index + 1}`), outcome,
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
