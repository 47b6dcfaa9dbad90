// Verify: two photos (POST /v1/verify) or a photo and an enrolled identity (POST /v1/verify/identity).

import { call, el, fill, fmt, showError } from "./api.js";
import { drawCrop, drawPhoto, loadImage, scoreBar } from "./draw.js";
import { enableDrop, listIdentityOptions } from "./widgets.js";

const $ = (id) => document.getElementById(id);

function mode() {
  return document.querySelector("input[name=verify-mode]:checked").value;
}

async function preview(input, canvas) {
  if (!input.files.length) {
    canvas.hidden = true;
    return null;
  }
  const img = await loadImage(input.files[0]).catch(() => null);
  if (img) drawPhoto(canvas, img); else canvas.hidden = true;
  return img;
}

function timingsTable(timings) {
  const rows = Object.entries(timings).map(([stage, value]) =>
    el("tr", {}, el("th", { scope: "row" }, stage), el("td", {}, fmt.ms(value))));
  return el("table", { class: "timings" },
    el("caption", {}, "Timings (decode, detect and align summed over the photos)"),
    el("tbody", {}, ...rows));
}

function faceCard(title, img, face) {
  const photo = el("canvas", { class: "photo" });
  const crop = el("canvas", { class: "crop" });
  if (img) drawPhoto(photo, img, face);
  const card = el("figure", { class: "face-card" }, photo,
    el("div", { class: "crop-wrap" }, crop, el("span", { class: "muted small" }, "aligned crop")),
    el("figcaption", {}, title,
      face ? el("span", { class: "muted small" },
        ` · detector score ${face.score.toFixed(2)}${face.faces_in_image > 1 ? ` · ${face.faces_in_image} faces, largest used` : ""}`) : null));
  if (img && face) drawCrop(crop, img, face); else crop.hidden = true;
  return card;
}

function render(result, sides) {
  const box = $("verify-result");
  const matched = result.match;
  const cards = sides.map(([title, img], i) => faceCard(title, img, result.faces ? result.faces[i] : result.face));
  const perTemplate = result.similarities
    ? el("p", { class: "muted small" },
      `Best of ${result.similarities.length} templates: ${result.similarities.map(fmt.sim).join(", ")}`)
    : null;
  fill(box,
    el("p", { class: `decision ${matched ? "ok" : "bad"}`, id: "verify-decision" },
      matched ? "Match" : "No match"),
    el("p", {}, `Similarity ${fmt.sim(result.similarity)} ${matched ? "≥" : "<"} threshold ${fmt.sim(result.threshold)} `,
      el("span", { class: "muted" }, `(threshold source: ${result.threshold_source})`)),
    scoreBar(result.similarity, result.threshold),
    perTemplate,
    el("div", { class: "pair" }, ...cards),
    timingsTable(result.timings_ms),
  );
  box.hidden = false;
}

async function submit(event) {
  event.preventDefault();
  const button = $("verify-submit");
  const errorBox = $("verify-error");
  showError(errorBox, null);
  $("verify-result").hidden = true;
  const first = $("verify-image1").files[0];
  const form = new FormData();
  let path;
  let sides;
  if (mode() === "identity") {
    const identity = $("verify-identity").value;
    form.append("image", first);
    form.append("identity_id", identity);
    path = "/v1/verify/identity";
    sides = [["First photo", await loadImage(first).catch(() => null)]];
  } else {
    const second = $("verify-image2").files[0];
    form.append("image1", first);
    form.append("image2", second);
    path = "/v1/verify";
    sides = [
      ["First photo", await loadImage(first).catch(() => null)],
      ["Second photo", await loadImage(second).catch(() => null)],
    ];
  }
  button.disabled = true;
  button.textContent = "Verifying…";
  try {
    render(await call("POST", path, { form }), sides);
  } catch (error) {
    showError(errorBox, error);
  } finally {
    button.disabled = false;
    button.textContent = "Verify";
  }
}

async function switchMode() {
  const byIdentity = mode() === "identity";
  $("verify-side2").hidden = byIdentity;
  $("verify-image2").required = !byIdentity;
  $("verify-identity-side").hidden = !byIdentity;
  $("verify-identity").required = byIdentity;
  if (byIdentity) {
    try {
      await listIdentityOptions($("verify-identity"));
    } catch (error) {
      showError($("verify-error"), error);
    }
  }
}

export function initVerify() {
  for (const n of [1, 2]) {
    const input = $(`verify-image${n}`);
    input.addEventListener("change", () => preview(input, $(`verify-canvas${n}`)));
  }
  enableDrop(document.querySelectorAll("#view-verify .drop"));
  for (const radio of document.querySelectorAll("input[name=verify-mode]")) {
    radio.addEventListener("change", switchMode);
  }
  $("verify-form").addEventListener("submit", submit);
}
