// The /ui page: calls this service's own API (relative URLs) and draws what it answers.
// No framework and no external resource: the page must work offline and under a strict CSP.
"use strict";

const KEY_STORE = "rlpips.apiKey";
// matplotlib's magma at 0, 0.2, ..., 1: the colour map of the service's heat maps.
const MAGMA = ["#000004", "#3b0f70", "#8c2981", "#de4968", "#fe9f6d", "#fcfdbf"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function fmt(x, digits = 4) {
  return Number(x).toFixed(digits);
}

// -- talking to the API ------------------------------------------------------------------------

class ApiFailure extends Error {}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

async function api(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  } catch (exc) {
    throw new ApiFailure(`cannot reach the service (${exc.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (exc) {
    body = null;
  }
  if (!response.ok) {
    const err = body && body.error;
    if (!err) throw new ApiFailure(`the service answered HTTP ${response.status}`);
    const where = err.field ? ` (field ${err.field})` : "";
    const retry = response.headers.get("Retry-After");
    const later = retry ? `; try again in ${retry} s` : "";
    throw new ApiFailure(`${err.code}: ${err.message}${where}${later}`);
  }
  return body;
}

function showError(id, exc) {
  const box = $(id);
  box.textContent = exc instanceof ApiFailure ? exc.message : `unexpected error: ${exc}`;
  box.hidden = false;
}

function clearError(id) {
  $(id).hidden = true;
  $(id).textContent = "";
}

// -- models ------------------------------------------------------------------------------------

async function loadModels() {
  const box = $("models");
  const hint = $("models-hint");
  box.querySelectorAll("label").forEach((n) => n.remove());
  hint.textContent = "Loading the models…";
  try {
    const { models } = await api("models");
    const loaded = models.filter((m) => m.loaded);
    for (const m of loaded) {
      const input = el("input", { type: "checkbox", name: "model", value: m.name });
      input.checked = m.default || m.name === "lpips-alex";
      box.append(el("label", {}, input, ` ${m.name}${m.default ? " (default)" : ""}`));
    }
    hint.textContent = loaded.length ? "" : "No model is loaded.";
    clearError("error");
  } catch (exc) {
    hint.textContent = "The models could not be listed.";
    showError("error", exc);
  }
}

function chosenModels() {
  return [...document.querySelectorAll('#models input[name="model"]:checked')].map((i) => i.value);
}

// -- files -------------------------------------------------------------------------------------

function showPreviews(input) {
  const box = $(`${input.id}-preview`);
  box.replaceChildren(
    ...[...input.files].map((f) => el("img", { src: URL.createObjectURL(f), alt: f.name }))
  );
  updateTargets();
}

function updateTargets() {
  const select = $("attack-target");
  const options = [...$("candidates").files].map((f, i) =>
    el("option", { value: String(i), text: `candidate ${i + 1}: ${f.name}` })
  );
  options.push(el("option", { value: "reference", text: "the reference itself" }));
  select.replaceChildren(...options);
}

function enableDrop(zone) {
  const input = $(zone.dataset.for);
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const moved = new DataTransfer();
    const dropped = [...e.dataTransfer.files].filter((f) => f.type.startsWith("image/"));
    for (const f of input.multiple ? dropped : dropped.slice(0, 1)) moved.items.add(f);
    input.files = moved.files;
    showPreviews(input);
  });
}

// -- distances ---------------------------------------------------------------------------------

function legend(top) {
  const bar = el("span", { class: "bar", role: "img", "aria-label": `colour scale from 0 to ${fmt(top)}` });
  bar.style.background = `linear-gradient(to right, ${MAGMA.join(", ")})`;
  return el("div", { class: "legend" }, el("span", { text: "0" }), bar, el("span", { text: fmt(top) }),
    el("span", { text: "per-pixel distance (shared by the candidates below)" }));
}

function layerBars(values) {
  const top = Math.max(...values) || 1;
  const rows = values.map((v, i) => {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${(100 * v) / top}%`;
    return el("div", { class: "layer" }, el("span", { text: `layer ${i + 1}` }),
      el("div", { class: "track", role: "img", "aria-label": `layer ${i + 1}: ${fmt(v)}` }, fill),
      el("span", { class: "value", text: fmt(v) }));
  });
  return el("div", { class: "layers" }, el("div", { text: "per-layer distance" }), ...rows);
}

function card(index, file, result, threshold) {
  const same = result.near_duplicate;
  const overlay = el("div", { class: "overlay" },
    el("img", { src: URL.createObjectURL(file), alt: `candidate ${index + 1}` }),
    el("img", { class: "heat", src: `data:image/png;base64,${result.spatial_png}`,
      alt: `heat map of where candidate ${index + 1} differs` }));
  return el("article", { class: "card", "data-index": String(index) },
    el("h4", { text: `candidate ${index + 1}: ${file.name}` }),
    overlay,
    el("p", {},
      el("span", { class: "distance", "data-value": String(result.distance), text: fmt(result.distance) }),
      " ",
      el("span", { class: `verdict ${same ? "same" : "different"}`,
        text: same ? `near duplicate (≤ ${fmt(threshold)})` : `different (> ${fmt(threshold)})` }),
      result.mirrored ? el("span", { class: "verdict mirrored", text: "its mirror matched" }) : null),
    result.per_layer ? layerBars(result.per_layer) : null);
}

async function compareWith(model, reference, candidates) {
  const form = new FormData();
  form.append("reference", reference);
  for (const c of candidates) form.append("candidate", c);
  form.append("model", model);
  form.append("spatial", "true");
  form.append("spatial_scale", "shared");
  form.append("per_layer", "true");
  if ($("hflip").checked) form.append("invariance", "hflip");
  const answer = await api("distance", { method: "POST", body: form });
  const top = answer.results.length ? answer.results[0].spatial_max : 0;
  return el("div", { class: "model-block", "data-model": model },
    el("h3", { text: `${answer.model} — threshold ${fmt(answer.threshold)}` }),
    legend(top),
    el("div", { class: "cards" },
      ...answer.results.map((r, i) => card(i, candidates[i], r, answer.threshold))));
}

async function compare(event) {
  event.preventDefault();
  clearError("error");
  const reference = $("reference").files[0];
  const candidates = [...$("candidates").files];
  const models = chosenModels();
  if (!reference || !candidates.length || !models.length) {
    showError("error", new ApiFailure("choose a reference, at least one candidate and a model"));
    return;
  }
  const button = $("compare");
  button.disabled = true;
  $("status").textContent = "Comparing…";
  try {
    const blocks = [];
    for (const model of models) blocks.push(await compareWith(model, reference, candidates));
    $("result-list").replaceChildren(...blocks);
    $("results").hidden = false;
    applyOpacity();
    $("status").textContent = `Compared ${candidates.length} candidate(s) with ${models.length} model(s).`;
  } catch (exc) {
    $("status").textContent = "";
    showError("error", exc);
  } finally {
    button.disabled = false;
  }
}

function applyOpacity() {
  const alpha = Number($("overlay").value) / 100;
  document.querySelectorAll(".overlay img.heat").forEach((img) => { img.style.opacity = alpha; });
}

// -- robustness --------------------------------------------------------------------------------

function loadImage(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiFailure("the service returned an unreadable image"));
    img.src = `data:image/png;base64,${b64}`;
  });
}

function pixels(img) {
  const canvas = el("canvas", { width: img.naturalWidth, height: img.naturalHeight });
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

// The perturbation (adversarial - attacked), amplified so that its largest step is ±127 around grey.
function perturbationCanvas(clean, adversarial) {
  const a = pixels(clean);
  const b = pixels(adversarial);
  let peak = 0;
  for (let i = 0; i < a.data.length; i += 4) {
    for (let c = 0; c < 3; c++) peak = Math.max(peak, Math.abs(b.data[i + c] - a.data[i + c]));
  }
  const gain = peak ? 127 / peak : 1;
  const out = new ImageData(a.width, a.height);
  for (let i = 0; i < a.data.length; i += 4) {
    for (let c = 0; c < 3; c++) out.data[i + c] = 128 + gain * (b.data[i + c] - a.data[i + c]);
    out.data[i + 3] = 255;
  }
  const canvas = el("canvas", { width: a.width, height: a.height, role: "img",
    "aria-label": `perturbation amplified ${gain.toFixed(1)} times` });
  canvas.getContext("2d").putImageData(out, 0, 0);
  return { canvas, gain };
}

function outcomeRow(r) {
  return el("tr", { "data-model": r.model, "data-clean": String(r.clean_distance),
    "data-adversarial": String(r.adversarial_distance), "data-flipped": String(r.flipped) },
    el("td", { text: r.model }),
    el("td", { text: fmt(r.clean_distance) }),
    el("td", { text: fmt(r.adversarial_distance) }),
    el("td", { text: (r.change >= 0 ? "+" : "") + fmt(r.change) }),
    el("td", { text: `${r.clean_match ? "match" : "no match"} → ${r.adversarial_match ? "match" : "no match"}` }),
    el("td", { class: r.flipped ? "flipped" : "", text: r.flipped ? "flipped" : "held" }));
}

function figure(node, caption) {
  return el("figure", {}, node, el("figcaption", { text: caption }));
}

async function renderAttack(answer) {
  const clean = await loadImage(answer.attacked_png);
  const rows = [];
  for (const r of answer.results) {
    const adv = await loadImage(r.adversarial_png);
    const { canvas, gain } = perturbationCanvas(clean, adv);
    const size = `L∞ ${fmt(r.perturbation.linf * 255, 1)}/255, L2 ${fmt(r.perturbation.l2, 3)}`;
    rows.push(el("h3", { text: `${r.model}: ${fmt(r.clean_distance)} → ${fmt(r.adversarial_distance)}` }),
      el("div", { class: "attack-grid", "data-model": r.model },
        figure(el("img", { src: clean.src, alt: "the attacked image" }), "attacked image (as the models see it)"),
        figure(el("img", { src: adv.src, alt: `adversarial image against ${r.model}` }), `adversarial against ${r.model}`),
        figure(canvas, `perturbation × ${gain.toFixed(1)} (${size})`)));
  }
  const head = el("tr", {}, ...["model", "clean", "attacked", "change", "decision", "outcome"]
    .map((t) => el("th", { scope: "col", text: t })));
  const what = `${answer.attack.goal}, ${answer.attack.attack} ε = ${fmt(answer.attack.epsilon, 4)}, ${answer.attack.steps} steps`;
  const table = el("table", {}, el("caption", { text: what }),
    el("thead", {}, head), el("tbody", {}, ...answer.results.map(outcomeRow)));
  $("attack-result").replaceChildren(table, ...rows);
}

async function attack(event) {
  event.preventDefault();
  clearError("attack-error");
  const reference = $("reference").files[0];
  const models = chosenModels();
  if (!reference || !models.length) {
    showError("attack-error", new ApiFailure("choose a reference (and a candidate to attack) and a model"));
    return;
  }
  const norm = $("attack-norm").value;
  const eps = Number($("attack-eps").value);
  const form = new FormData();
  form.append("reference", reference);
  const target = $("attack-target").value;
  if (target !== "reference" && target !== "") form.append("candidate", $("candidates").files[Number(target)]);
  form.append("models", models.join(","));
  form.append("attack", norm);
  form.append("epsilon", String(norm === "linf" ? eps / 255 : eps));
  form.append("steps", $("attack-steps").value);
  form.append("goal", $("attack-goal").value);
  form.append("return_adversarial", "true");
  if ($("hflip").checked) form.append("invariance", "hflip");
  const button = $("attack");
  button.disabled = true;
  $("attack-status").textContent = "Attacking… (one model after another; this can take a while)";
  try {
    await renderAttack(await api("robustness-check", { method: "POST", body: form }));
    $("attack-status").textContent = "Attack finished.";
  } catch (exc) {
    $("attack-status").textContent = "";
    showError("attack-error", exc);
  } finally {
    button.disabled = false;
  }
}

// -- wiring ------------------------------------------------------------------------------------

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  if (key.value) $("key-box").open = true;
  key.addEventListener("change", () => {
    if (key.value) sessionStorage.setItem(KEY_STORE, key.value);
    else sessionStorage.removeItem(KEY_STORE);
    loadModels();
  });
  for (const id of ["reference", "candidates"]) $(id).addEventListener("change", (e) => showPreviews(e.target));
  document.querySelectorAll(".drop").forEach(enableDrop);
  $("compare-form").addEventListener("submit", compare);
  $("attack-form").addEventListener("submit", attack);
  $("overlay").addEventListener("input", applyOpacity);
  $("attack-norm").addEventListener("change", () => {
    const linf = $("attack-norm").value === "linf";
    $("eps-unit").textContent = linf ? "(levels of 255)" : "(L2, [0, 1] pixel units)";
    $("attack-eps").value = linf ? "8" : "1.0";
  });
  updateTargets();
  loadModels();
}

init();
