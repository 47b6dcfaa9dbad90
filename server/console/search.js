// Search: one photo in, the k best enrolled identities out (POST /v1/search).

import { call, el, fill, fmt, showError } from "./api.js";
import { barStart, drawPhoto, loadImage, scoreBar } from "./draw.js";
import { enableDrop } from "./widgets.js";

const $ = (id) => document.getElementById(id);
let image = null;

function candidateRow(candidate, rank, threshold, lo) {
  return el("tr", { class: candidate.match ? "match" : "" },
    el("td", { class: "num" }, String(rank)),
    el("th", { scope: "row" }, candidate.identity_id),
    el("td", {}, candidate.name || "–"),
    el("td", { class: "num" }, fmt.sim(candidate.similarity)),
    el("td", { class: "bar-cell" }, scoreBar(candidate.similarity, threshold, lo)),
    el("td", { class: "num" }, fmt.pct(candidate.estimated_fpir)),
    el("td", {}, candidate.match ? el("span", { class: "ok" }, "match") : el("span", { class: "bad" }, "no match")));
}

function render(result) {
  const best = result.match;
  const headline = best
    ? `Match: ${best.identity_id}${best.name ? ` (${best.name})` : ""}`
    : result.candidates.length ? "No match: nobody enrolled passes the threshold" : "No match: the gallery is empty";
  const lo = barStart(result.candidates.map((c) => c.similarity), result.threshold);
  const gallery = `${result.gallery.identities} identities, ${result.gallery.templates} templates`;
  const table = el("table", { id: "search-candidates" },
    el("caption", {}, `Best ${result.candidates.length} candidates at threshold ${fmt.sim(result.threshold)}`),
    el("thead", {}, el("tr", {}, ...["#", "Identity", "Name", "Similarity", "Against the threshold", "Chance a stranger scores this", "Decision"]
      .map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...result.candidates.map((c, i) => candidateRow(c, i + 1, result.threshold, lo))));
  fill($("search-result"),
    el("p", { class: `decision ${best ? "ok" : "bad"}`, id: "search-decision" }, headline),
    el("p", { class: "muted small", id: "search-assumed" },
      `Threshold for a gallery of ${gallery}: it holds the share of people never enrolled who would be "found" (FPIR) at ${fmt.pct(result.target_fpir)}` +
      (result.estimated_fpir == null ? "." : `; the best candidate's similarity is reached by ${fmt.pct(result.estimated_fpir)} of strangers.`)),
    el("div", { class: "scroll" }, table),
    el("p", { class: "muted small" }, `Took ${fmt.ms(result.timings_ms.total)} in all.`));
  $("search-result").hidden = false;
  if (image) drawPhoto($("search-canvas"), image, result.face);
}

async function submit(event) {
  event.preventDefault();
  const button = $("search-submit");
  showError($("search-error"), null);
  $("search-result").hidden = true;
  const form = new FormData();
  form.append("image", $("search-image").files[0]);
  form.append("k", $("search-k").value || "5");
  button.disabled = true;
  button.textContent = "Searching…";
  try {
    render(await call("POST", "/v1/search", { form }));
  } catch (error) {
    showError($("search-error"), error);
  } finally {
    button.disabled = false;
    button.textContent = "Search";
  }
}

export function initSearch() {
  enableDrop(document.querySelectorAll("#view-search .drop"));
  $("search-image").addEventListener("change", async () => {
    const file = $("search-image").files[0];
    image = file ? await loadImage(file).catch(() => null) : null;
    if (image) drawPhoto($("search-canvas"), image); else $("search-canvas").hidden = true;
  });
  $("search-form").addEventListener("submit", submit);
}
