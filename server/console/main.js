// The console's entry point: keys, server status, and the five views as keyboard-friendly tabs.

import { keys } from "./api.js";
import { initAudit, loadAudit } from "./audit.js";
import { initConsistency, loadConsistency } from "./consistency.js";
import { initGallery, refresh as refreshList } from "./gallery.js";
import { initSearch } from "./search.js";
import { initVerify } from "./verify.js";

const $ = (id) => document.getElementById(id);
const ON_SHOW = { gallery: refreshList, consistency: loadConsistency, audit: loadAudit };

function showTab(tab, focus = false) {
  for (const other of document.querySelectorAll("[role=tab]")) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  const view = tab.id.replace("tab-", "");
  if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
  ON_SHOW[view]?.();
}

function initTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => showTab(tab));
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      showTab(tabs[(next + tabs.length) % tabs.length], true);
    });
  }
  const fromHash = () => {
    const tab = $(`tab-${location.hash.slice(1)}`);
    if (tab && tab.getAttribute("aria-selected") !== "true") showTab(tab);
  };
  window.addEventListener("hashchange", fromHash);
  fromHash();
}

function showKeyState() {
  const parts = [keys.api ? "API key set" : "no API key", keys.admin ? "admin key set" : "no admin key"];
  $("keys-state").textContent = `(${parts.join(", ")})`;
}

function initKeys() {
  $("api-key").value = keys.api;
  $("admin-key").value = keys.admin;
  $("keys-form").addEventListener("submit", (event) => {
    event.preventDefault();
    keys.save($("api-key").value.trim(), $("admin-key").value.trim());
    showKeyState();
    $("keys").open = false;
  });
  $("keys-clear").addEventListener("click", () => {
    keys.save("", "");
    $("api-key").value = $("admin-key").value = "";
    showKeyState();
  });
  showKeyState();
}

async function showReady() {
  const line = $("ready");
  try {
    const response = await fetch("/readyz");
    const ready = await response.json();
    line.textContent = ready.ready
      ? `Ready · ${ready.model_id} · ${ready.runtime} · detector ${ready.detector} · ${ready.identities} identities, ${ready.templates} templates`
      : "The server is still loading the model.";
    line.className = `ready ${ready.ready ? "ok" : "bad"}`;
  } catch {
    line.textContent = "The server is not answering.";
    line.className = "ready bad";
  }
}

initKeys();
initVerify();
initGallery();
initSearch();
initConsistency();
initAudit();
initTabs();
showReady();
document.addEventListener("gallery-changed", showReady);  // the identity and template counts
