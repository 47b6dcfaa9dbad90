// Drawing on canvases: a photo with its face box and landmarks, the aligned crop, a score bar.

import { el, fmt } from "./api.js";

const MAX_SIDE = 360;
let geometryPromise = null;

// Where the served model's alignment puts the five landmarks (fetched once, no key needed).
function geometry() {
  geometryPromise ??= fetch("geometry.json").then((r) => (r.ok ? r.json() : null)).catch(() => null);
  return geometryPromise;
}

// A File as a decoded <img> (EXIF orientation applied, as the server applies it).
export async function loadImage(file) {
  const img = new Image();
  img.src = URL.createObjectURL(file);
  await img.decode();
  return img;
}

// The photo scaled to fit, with the face's box and landmarks when given.
export function drawPhoto(canvas, img, face) {
  // Small photos are enlarged (up to 2x) so the box and landmarks can be seen.
  const scale = Math.min(2, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  canvas.hidden = false;
  if (!face) {
    canvas.setAttribute("aria-label", "the photo");
    return;
  }
  const [x1, y1, x2, y2] = face.box.map((v) => v * scale);
  ctx.lineWidth = Math.max(2, canvas.width / 150);
  ctx.strokeStyle = "#00e07a";
  ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  ctx.fillStyle = "#ff2bd6";  // magenta with a dark rim: visible on skin, hair and sky
  ctx.strokeStyle = "#111";
  ctx.lineWidth = 1;
  for (const [x, y] of face.landmarks) {
    ctx.beginPath();
    ctx.arc(x * scale, y * scale, Math.max(3, canvas.width / 90), 0, 2 * Math.PI);
    ctx.fill();
    ctx.stroke();
  }
  const others = face.faces_in_image > 1 ? `, ${face.faces_in_image} faces found, the largest used` : "";
  canvas.setAttribute("aria-label", `the photo with the detected face boxed and ${face.landmarks.length} landmarks marked${others}`);
}

// Least-squares similarity (rotation, scale, shift) mapping points src onto dst.
function similarity(src, dst) {
  const n = src.length;
  const mean = (pts, i) => pts.reduce((s, p) => s + p[i], 0) / n;
  const [sx, sy, dx, dy] = [mean(src, 0), mean(src, 1), mean(dst, 0), mean(dst, 1)];
  let a = 0, b = 0, norm = 0;
  for (let i = 0; i < n; i++) {
    const [x, y] = [src[i][0] - sx, src[i][1] - sy];
    const [u, v] = [dst[i][0] - dx, dst[i][1] - dy];
    a += x * u + y * v;
    b += x * v - y * u;
    norm += x * x + y * y;
  }
  a /= norm;
  b /= norm;
  return { a, b, tx: dx - (a * sx - b * sy), ty: dy - (b * sx + a * sy) };
}

// The aligned crop the model sees, redrawn from the landmarks and the model's geometry.
export async function drawCrop(canvas, img, face) {
  const geo = await geometry();
  if (!geo || !face || face.landmarks.length !== geo.points.length) {
    canvas.hidden = true;
    return;
  }
  const { a, b, tx, ty } = similarity(face.landmarks, geo.points);
  canvas.width = canvas.height = geo.size;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(a, b, -b, a, tx, ty);
  ctx.drawImage(img, 0, 0);
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  canvas.hidden = false;
  canvas.setAttribute("aria-label", `the aligned ${geo.size}×${geo.size} face crop the model embeds`);
}

// The left end of a bar scale that shows every score and the threshold.
export function barStart(scores, threshold) {
  return Math.max(-1, Math.floor((Math.min(threshold, ...scores) - 0.1) * 10) / 10);
}

// A horizontal bar: the similarity against the threshold, from lo (one scale for a table).
export function scoreBar(similarity, threshold, lo = barStart([similarity], threshold)) {
  const hi = 1;
  const at = (v) => `${(100 * (Math.min(hi, Math.max(lo, v)) - lo)) / (hi - lo)}%`;
  const passed = similarity >= threshold;
  const fill = el("div", { class: `fill ${passed ? "ok" : "bad"}` });
  fill.style.width = at(similarity);
  const mark = el("div", { class: "mark", title: `threshold ${fmt.sim(threshold)}` });
  mark.style.left = at(threshold);
  const markLabel = el("span", { class: "mark-label" }, `t = ${fmt.sim(threshold)}`);
  markLabel.style.left = at(threshold);
  return el(
    "div",
    { class: "bar-wrap" },
    el("div", {
      class: "bar",
      role: "img",
      "aria-label": `similarity ${fmt.sim(similarity)} ${passed ? "at or above" : "below"} the threshold ${fmt.sim(threshold)}`,
    }, fill, mark),
    markLabel,
    el("div", { class: "axis" }, el("span", {}, lo.toFixed(1)), el("span", {}, hi.toFixed(1))),
  );
}
