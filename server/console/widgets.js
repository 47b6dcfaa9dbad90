// Shared controls: drop zones around file inputs, and the identity picker.

import { call, el } from "./api.js";

// Dropping files on a .drop zone fills its file input (as choosing them would).
export function enableDrop(zones) {
  for (const zone of zones) {
    const input = document.getElementById(zone.dataset.for);
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (!event.dataTransfer.files.length) return;
      input.files = event.dataTransfer.files;
      input.dispatchEvent(new Event("change"));
    });
  }
}

// Fill a <select> with the enrolled identities (the first 1000).
export async function listIdentityOptions(select) {
  const page = await call("GET", "/v1/identities", { query: { limit: 1000 } });
  const chosen = select.value;
  select.replaceChildren(...page.identities.map((identity) =>
    el("option", { value: identity.identity_id, selected: identity.identity_id === chosen },
      identity.name ? `${identity.identity_id} (${identity.name})` : identity.identity_id)));
  if (!page.identities.length) {
    select.append(el("option", { value: "" }, "no identities enrolled yet"));
  }
}
