// Audit: who did what to whom, newest first (GET /v1/audit, admin scope), filtered by identity.

import { call, el, fill, showError } from "./api.js";

const $ = (id) => document.getElementById(id);
const COLUMNS = ["When (UTC)", "Key", "Action", "Identity", "Outcome", "Status", "Request id"];

function row(record) {
  const when = new Date(record.at * 1000).toISOString().replace("T", " ").slice(0, 19);
  return el("tr", {},
    el("td", {}, when),
    el("td", {}, record.key_name),
    el("th", { scope: "row" }, record.action),
    el("td", {}, record.identity_id || "–"),
    el("td", {}, record.outcome),
    el("td", { class: "num" }, String(record.status)),
    el("td", { class: "muted small" }, record.request_id));
}

export async function loadAudit() {
  const identity = $("audit-identity").value.trim();
  showError($("audit-error"), null);
  try {
    const page = await call("GET", "/v1/audit", {
      admin: true, query: identity ? { identity_id: identity, limit: 100 } : { limit: 100 } });
    const table = el("table", { id: "audit-table" },
      el("caption", {}, `${page.records.length} most recent records${identity ? ` about ${identity}` : ""}`),
      el("thead", {}, el("tr", {}, ...COLUMNS.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...page.records.map(row)));
    fill($("audit-result"), el("div", { class: "scroll" }, table));
    $("audit-result").hidden = false;
  } catch (error) {
    $("audit-result").hidden = true;
    showError($("audit-error"), error);
  }
}

export function initAudit() {
  $("audit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadAudit();
  });
}
