// Search by photo: send the chosen or dropped photo to POST /query and show the answer; before
// that (idle), show what the index holds: its landmarks, each with a thumbnail.
// The footer's #status holds the state for people and tests: data-state idle|busy|done|error,
// data-landmark (best landmark id), data-errors (script errors seen).
"use strict";
const $ = (id) => document.getElementById(id);
const status = $("status");
let errors = 0;
window.addEventListener("error", () => { errors += 1; status.dataset.errors = errors; });

function setState(state, text) {
  status.dataset.state = state;
  status.textContent = state;
  $("message").textContent = text || "";
  $("message").className = state === "error" ? "error" : "";
}

function element(tag, props, ...children) {
  const node = Object.assign(document.createElement(tag), props || {});
  node.append(...children);
  return node;
}

function thumbnailCard(url, title, lines) {
  const card = element("div", {className: "candidate"});
  if (url) card.append(element("img", {src: url, alt: title, loading: "lazy"}));
  card.append(element("b", {}, title));
  for (const line of lines) card.append(element("div", {}, line));
  return card;
}

// P(right) as a percentage (never a rounded 100% or 0%), or the raw score when the index has no calibration.
function shown(mark, calibrated) {
  if (!calibrated) return `score ${mark.score.toFixed(3)}`;
  const p = mark.confidence;
  return "confidence " + (p >= 0.9995 ? ">99.9%" : p < 0.0005 ? "<0.1%" : `${(100 * p).toFixed(1)}%`);
}

function showAnswer(answer) {
  const landmarks = $("landmarks");
  landmarks.replaceChildren();
  for (const mark of answer.landmarks) {
    const button = element("button", {type: "button", title: "show its index photos"}, mark.landmark_id);
    button.addEventListener("click", () => showLandmark(mark.landmark_id));
    landmarks.append(element("li", {}, button,
      element("span", {className: "confidence"}, shown(mark, answer.calibrated))));
  }
  if (!answer.landmarks.length) landmarks.append(element("li", {}, "no landmark found"));
  $("candidates").replaceChildren(...answer.candidates.map((c) => thumbnailCard(
    c.thumbnail, c.landmark_id ?? "(no label)",
    [`global ${c.global_score.toFixed(3)}`, c.inliers >= 0 ? `${c.inliers} inliers` : "not verified"])));
  const match = $("match");
  if (answer.match_picture) { match.src = answer.match_picture; match.hidden = false; }
  else { match.removeAttribute("src"); match.hidden = true; }
  const ms = answer.timings_ms;
  const total = Object.values(ms).reduce((a, b) => a + b, 0);
  $("timing").textContent = `${total.toFixed(0)} ms: ` +
    Object.entries(ms).map(([step, t]) => `${step} ${t.toFixed(0)}`).join(", ");
  $("gallery").replaceChildren();
  $("gallery-title").hidden = true;
  status.dataset.landmark = answer.landmarks.length ? answer.landmarks[0].landmark_id : "";
}

async function showLandmark(id) {
  const response = await fetch("/landmarks/" + encodeURIComponent(id));
  if (!response.ok) return setState("error", (await response.json()).detail);
  const body = await response.json();
  $("gallery-title").textContent = `Index photos of ${id} (${body.images.length})`;
  $("gallery-title").hidden = false;
  $("gallery").replaceChildren(...body.images.map((im) => thumbnailCard(im.thumbnail, im.id, [])));
}

async function search(file) {
  if (!file) return;
  $("photo").src = URL.createObjectURL(file);
  $("photo-name").textContent = file.name;
  $("holds").hidden = true;
  $("result").hidden = false;
  setState("busy", "searching...");
  const form = new FormData();
  form.append("photo", file, file.name);
  try {
    const response = await fetch("/query?picture=true", {method: "POST", body: form});
    const body = await response.json();
    if (!response.ok) return setState("error", `${response.status}: ${body.detail}`);
    showAnswer(body);
    setState("done", "");
  } catch (error) {
    setState("error", `the service did not answer: ${error}`);
  }
}

const drop = $("drop");
$("photo-input").addEventListener("change", (event) => search(event.target.files[0]));
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  search(event.dataTransfer.files[0]);
});

fetch("/health").then((r) => r.json()).then((h) => {
  $("index-facts").textContent =
    `${h.images} index photos of ${h.landmarks} landmarks · preset ${h.preset} · ` +
    (h.calibrated ? "confidences are probabilities" : "no calibration: raw scores") +
    ` · delf_pipeline ${h.package_version}`;
});

fetch("/landmarks").then((r) => r.json()).then((body) => {
  $("holds-title").textContent = `What the index holds: ${body.landmarks} landmarks` +
    (body.shown.length < body.landmarks ? ` (the ${body.shown.length} with the most photos)` : "");
  $("holds-list").replaceChildren(...body.shown.map((mark) => {
    const card = thumbnailCard(mark.thumbnail, mark.landmark_id,
      [`${mark.images} photo${mark.images === 1 ? "" : "s"}`]);
    card.title = "show its index photos";
    card.addEventListener("click", () => showLandmark(mark.landmark_id));
    return card;
  }));
  status.dataset.holds = body.shown.length;
});
