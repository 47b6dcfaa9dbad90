// Consistency: GET /v1/consistency (OPIS, per-identity FRR/FAR and own thresholds) and
// GET /v1/consistency/live (live scores by decision), drawn as HTML bar charts.

import { call, el, fill, fmt, showError } from "./api.js";

const $ = (id) => document.getElementById(id);
const SHOWN = 25;

const pos = (v, lo, hi) => `${(100 * (Math.min(hi, Math.max(lo, v)) - lo)) / (hi - lo)}%`;

function bar(cls, value, scale, label) {
  const node = el("div", { class: `hbar ${cls}`, title: label });
  node.style.width = pos(value ?? 0, 0, scale);
  return node;
}

// Worst first: the most errors at t (FRR + FAR), then the own threshold highest above t
// (look-alikes closest to passing). A large gap below t is a margin, not a problem.
function ranked(report) {
  const errors = (r) => (r.frr ?? 0) + (r.far ?? 0);
  const gap = (r) => r.threshold_gap ?? -Infinity;
  return Object.entries(report.per_identity)
    .map(([id, r]) => ({ id, ...r }))
    .sort((a, b) => errors(b) - errors(a) || gap(b) - gap(a) || a.id.localeCompare(b.id));
}

// What an operator can do about one identity, from where its threshold sits against t.
function advice(r, report) {
  if (r.genuine_pairs === 0) return "One usable photo: add two or more so its own pairs can be measured.";
  if (r.impostor_pairs === 0) return "Nobody else enrolled yet to compare it with.";
  const far = r.far ?? 0;
  const frr = r.frr ?? 0;
  if (far > report.target_far) {
    return `Look-alikes pass at t (FAR ${fmt.pct(far)}): check its photos for another person; if they are clean, raise the threshold (FACEGATE_THRESHOLD) or review its matches.`;
  }
  if (frr > 0) {
    return `Its own photos fall under t (FRR ${fmt.pct(frr)}): re-enrol with sharp, front-facing photos and delete poor templates.`;
  }
  if ((r.threshold_gap ?? 0) < -0.05) return "Well separated: t is stricter than it needs; nothing to do.";
  return "Served well by t.";
}

function summary(report) {
  const item = (term, value, note) => [el("dt", {}, term), el("dd", {}, value, note ? el("span", { class: "muted small" }, ` ${note}`) : null)];
  return el("dl", { class: "summary" },
    ...item("Unified threshold t", fmt.sim(report.threshold)),
    ...item("Target FAR", fmt.pct(report.target_far), "(for each identity's own threshold)"),
    ...item("Identities", String(report.identities), `(${report.opis_identities} with genuine and impostor pairs)`),
    ...item("OPIS", report.opis == null ? "–" : report.opis.toExponential(2), "(lower: one threshold suits everyone better)"),
    ...item("ε-OPIS", report.epsilon_opis == null ? "–" : report.epsilon_opis.toExponential(2)));
}

// The threshold each question is decided at now, and the rate it holds.
function operatingPoints(points) {
  const holds = (p, rate) => (p.target == null ? `${p.source}` : `${rate} ${fmt.pct(p.target)} (${p.source})`);
  const rows = [
    ["1:1 pair", fmt.sim(points.pair.threshold), holds(points.pair, "FAR"), "–"],
    ...points.identity.map((p) => [`Identity with ${p.templates} template${p.templates === 1 ? "" : "s"}`,
      fmt.sim(p.threshold), holds(p, "FAR"), String(p.identities)]),
    [`Search of the gallery (${points.search.identities} identities, ${points.search.templates} templates)`,
      fmt.sim(points.search.threshold), holds(points.search, "FPIR"), "–"],
  ];
  return el("table", { id: "operating-points" },
    el("caption", {}, "Thresholds in force: each decision holds its target error rate"),
    el("thead", {}, el("tr", {}, ...["Decision", "Threshold", "Holds", "Identities"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, el("th", { scope: "row" }, r[0]),
      el("td", { class: "num" }, r[1]), el("td", {}, r[2]), el("td", { class: "num" }, r[3])))));
}

function rateChart(rows) {
  const scale = Math.max(0.05, ...rows.map((r) => Math.max(r.frr ?? 0, r.far ?? 0)));
  return el("figure", { class: "chart", id: "chart-rates" },
    el("figcaption", {}, "FRR and FAR of each identity at t (worst first)",
      el("span", { class: "legend" }, el("i", { class: "key frr" }), "FRR ", el("i", { class: "key far" }), "FAR"),
      el("span", { class: "muted small" }, ` · scale 0 – ${fmt.pct(scale)}`)),
    ...rows.map((r) => el("div", { class: "chart-row", "data-identity": r.id },
      el("span", { class: "chart-label" }, r.id),
      el("div", { class: "chart-track", role: "img", "aria-label": `${r.id}: FRR ${fmt.pct(r.frr)}, FAR ${fmt.pct(r.far)}` },
        bar("frr", r.frr, scale, `FRR ${fmt.pct(r.frr)}`), bar("far", r.far, scale, `FAR ${fmt.pct(r.far)}`)),
      el("span", { class: "chart-value small" }, `${fmt.pct(r.frr)} / ${fmt.pct(r.far)}`))));
}

function thresholdChart(rows, t, targetFar) {
  const owns = rows.map((r) => r.own_threshold).filter((v) => v != null);
  if (!owns.length) {
    return el("figure", { class: "chart", id: "chart-thresholds" },
      el("figcaption", {}, "Each identity's own threshold against t"),
      el("p", { class: "muted" }, `No identity has enough impostor pairs yet to place its own threshold at FAR ${fmt.pct(targetFar)}: that takes ${Math.ceil(1 / targetFar)} pairs. Enrol more people (or set a larger FACEGATE_TARGET_FAR).`));
  }
  const lo = Math.floor((Math.min(t, ...owns) - 0.02) * 50) / 50;
  const hi = Math.ceil((Math.max(t, ...owns) + 0.02) * 50) / 50;
  const tLine = () => {
    const line = el("div", { class: "t-line" });
    line.style.left = pos(t, lo, hi);
    return line;
  };
  return el("figure", { class: "chart", id: "chart-thresholds" },
    el("figcaption", {}, "Each identity's own threshold (its FAR at the target) against t",
      el("span", { class: "muted small" }, ` · axis ${lo.toFixed(2)} – ${hi.toFixed(2)}; right of t: look-alikes pass, left: t is stricter than needed`)),
    ...rows.map((r) => {
      const track = el("div", { class: "chart-track axis-track", role: "img",
        "aria-label": `${r.id}: own threshold ${fmt.sim(r.own_threshold)}, t ${fmt.sim(t)}` }, tLine());
      if (r.own_threshold != null) {
        const span = el("div", { class: `gap ${r.own_threshold > t ? "above" : "below"}` });
        span.style.left = pos(Math.min(t, r.own_threshold), lo, hi);
        span.style.width = `calc(${pos(Math.max(t, r.own_threshold), lo, hi)} - ${pos(Math.min(t, r.own_threshold), lo, hi)})`;
        const dot = el("div", { class: `dot ${r.own_threshold > t ? "above" : "below"}` });
        dot.style.left = pos(r.own_threshold, lo, hi);
        track.append(span, dot);
      }
      return el("div", { class: "chart-row", "data-identity": r.id },
        el("span", { class: "chart-label" }, r.id), track,
        el("span", { class: "chart-value small" }, r.threshold_gap == null ? "–" : `${r.threshold_gap > 0 ? "+" : ""}${r.threshold_gap.toFixed(3)}`));
    }));
}

function worstTable(rows, report) {
  const head = ["Identity", "Own pairs", "FRR", "FAR", "Own threshold", "Gap to t", "Live decisions", "What to do"];
  return el("div", { class: "scroll" }, el("table", { id: "consistency-table" },
    el("caption", {}, "Identities, worst first (most errors at t, then own threshold highest above t)"),
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", { "data-identity": r.id },
      el("th", { scope: "row" }, r.id),
      el("td", { class: "num" }, String(r.genuine_pairs)),
      el("td", { class: "num" }, fmt.pct(r.frr)),
      el("td", { class: "num" }, fmt.pct(r.far)),
      el("td", { class: "num" }, fmt.sim(r.own_threshold)),
      el("td", { class: "num" }, r.threshold_gap == null ? "–" : r.threshold_gap.toFixed(3)),
      el("td", { class: "num" }, r.observed.count ? `${r.observed.count} (${fmt.pct(r.observed.accept_rate)} accepted)` : "none"),
      el("td", {}, advice(r, report)))))));
}

function histogram(live) {
  const figure = el("figure", { class: "chart", id: "chart-live" },
    el("figcaption", {}, `Live similarity scores by decision (${live.decisions} recorded)`,
      el("span", { class: "legend" }, el("i", { class: "key match" }), "match ", el("i", { class: "key no-match" }), "no match")));
  if (!live.bins.length) {
    figure.append(el("p", { class: "muted" }, "No live decisions yet. They are recorded when a photo is verified against an enrolled identity (Verify, then “an enrolled identity”)."));
    return figure;
  }
  const lo = live.bins[0].lo;
  const hi = live.bins[live.bins.length - 1].hi;
  const peak = Math.max(...live.bins.map((b) => b.match + b.no_match));
  const columns = live.bins.map((b) => {
    const col = el("div", { class: "hist-col", title: `${b.lo.toFixed(3)} – ${b.hi.toFixed(3)}: ${b.match} match, ${b.no_match} no match` });
    for (const [cls, n] of [["no-match", b.no_match], ["match", b.match]]) {
      if (!n) continue;
      const part = el("div", { class: `hist-part ${cls}` });
      part.style.height = `${(100 * n) / peak}%`;
      col.append(part);
    }
    return col;
  });
  const tLine = el("div", { class: "t-line", title: `threshold ${fmt.sim(live.threshold)}` },
    el("span", { class: "t-label" }, `t = ${fmt.sim(live.threshold)}`));
  tLine.style.left = pos(live.threshold, lo, hi);
  figure.append(
    el("div", { class: "hist", role: "img",
      "aria-label": `${live.matches} matches and ${live.decisions - live.matches} rejections between ${lo.toFixed(2)} and ${hi.toFixed(2)}, threshold ${fmt.sim(live.threshold)}` },
    ...columns, tLine),
    el("div", { class: "axis" }, el("span", {}, lo.toFixed(2)), el("span", {}, "similarity"), el("span", {}, hi.toFixed(2))));
  return figure;
}

async function load() {
  const button = $("consistency-refresh");
  showError($("consistency-error"), null);
  button.disabled = true;
  button.textContent = "Computing…";
  try {
    const [report, live] = await Promise.all([call("GET", "/v1/consistency"), call("GET", "/v1/consistency/live")]);
    const rows = ranked(report);
    const shown = rows.slice(0, SHOWN);
    const more = rows.length > SHOWN ? el("p", { class: "muted small" }, `The ${SHOWN} worst of ${rows.length} identities are charted; the table lists all.`) : null;
    fill($("consistency-result"),
      summary(report),
      el("div", { class: "scroll" }, operatingPoints(report.operating_points)),
      rows.length ? el("div", { class: "charts" }, rateChart(shown), thresholdChart(shown, report.threshold, report.target_far)) : el("p", {}, "Enrol identities (two or more photos each) to see the report."),
      more,
      rows.length ? worstTable(rows, report) : null,
      histogram(live));
    $("consistency-result").hidden = false;
  } catch (error) {
    showError($("consistency-error"), error);
  } finally {
    button.disabled = false;
    button.textContent = "Recompute the report";
  }
}

export function initConsistency() {
  $("consistency-refresh").addEventListener("click", load);
}

export { load as loadConsistency };
