// The segmentation page: choose a scan, send it to POST /segment, show the mask over the scan with NiiVue.
// Everything is served by the service itself (no other origin). File names never leave the browser: parts are
// sent as "flair.nii.gz" and so on. The API key lives in this tab's sessionStorage only.
import { Niivue, NVImage } from "/static/vendor/niivue/index.js";

const PARTS = ["flair", "t1", "t1ce", "t2", "image", "label"];
const MODALITIES = ["flair", "t1", "t1ce", "t2"];
const KEY_STORE = "brats-api-key";
// BraTS labels 0..4 (3 unused): transparent, NCR/NET red, edema green, -, enhancing yellow.
const LABEL_COLOURS = { R: [0, 255, 0, 0, 255], G: [0, 0, 200, 0, 220], B: [0, 0, 0, 0, 0], A: [0, 255, 255, 0, 255],
  I: [0, 1, 2, 3, 4], labels: ["", "NCR/NET", "edema", "", "enhancing"] };

const $ = (id) => document.getElementById(id);
const input = (part) => $(`file-${part}`);
const chosen = (part) => input(part).files[0] || null;
let viewer = null;
let result = null;

function setState(state, text = "") {
  document.body.dataset.state = state;
  $("status").textContent = text;
}

function showProblem(text) {
  $("problem").textContent = text;
  $("problem").hidden = !text;
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function problemText(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.title || ""}: ${body.detail || ""}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const response = await fetch("/models", { headers: headers() });
  if (!response.ok) {
    showProblem(`Models could not be listed (${await problemText(response)}); enter the API key, if one is needed.`);
    return;
  }
  const body = await response.json();
  const select = $("model");
  select.replaceChildren(new Option(`default (${body.default ?? "none"})`, ""));
  for (const model of body.models) select.add(new Option(model.name, model.name));
  if (body.models.length > 1) select.add(new Option("ensemble (average of all)", "ensemble"));
  showProblem("");
}

// ------------------------------------------------------------------------------------------- choosing files
function partFor(name, count) {
  const n = name.toLowerCase();
  if (/seg|label|mask|truth/.test(n)) return "label";
  if (/flair/.test(n)) return "flair";
  if (/t1ce|t1c|t1gd|post|gd|contrast/.test(n)) return "t1ce";
  if (/t2/.test(n)) return "t2";
  if (/t1/.test(n)) return "t1";
  return count === 1 ? "image" : null;
}

function assign(files) {
  const unknown = [];
  for (const file of files) {
    const part = partFor(file.name, files.length);
    if (!part) { unknown.push(file); continue; }
    const transfer = new DataTransfer();
    transfer.items.add(file);
    input(part).files = transfer.files;
  }
  showProblem(unknown.length ? `${unknown.length} file(s) could not be matched to a modality by name; choose them ` +
    "in the slots below." : "");
}

function form() {
  const image = chosen("image");
  const modalities = MODALITIES.filter((m) => chosen(m));
  if (image && modalities.length) throw new Error("Choose either the four modalities or one 4D image, not both.");
  if (!image && modalities.length < MODALITIES.length) {
    const missing = MODALITIES.filter((m) => !chosen(m));
    throw new Error(`Choose the four modalities (missing: ${missing.join(", ")}) or one 4D image.`);
  }
  const data = new FormData();
  for (const part of image ? ["image"] : MODALITIES) data.append(part, chosen(part), `${part}.nii.gz`);
  if (chosen("label")) data.append("label", chosen("label"), "label.nii.gz");
  return data;
}

// ------------------------------------------------------------------------------------------- segmenting
function send(data) {
  const params = new URLSearchParams({ format: "json", tta: String($("tta").checked) });
  if ($("model").value) params.set("model", $("model").value);
  return new Promise((resolve) => {
    const request = new XMLHttpRequest();
    request.open("POST", `/segment?${params}`);
    for (const [name, value] of Object.entries(headers())) request.setRequestHeader(name, value);
    request.responseType = "json";
    $("progress").hidden = false;
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) $("progress").value = (100 * event.loaded) / event.total;
    };
    request.upload.onload = () => setState("running", "Uploaded; segmenting on the service…");
    request.onload = () => resolve({ status: request.status, body: request.response });
    request.onerror = () => resolve({ status: 0, body: { title: "Network error", detail: "the service did not answer" } });
    request.send(data);
  });
}

async function segment() {
  showProblem("");
  let data;
  try { data = form(); } catch (error) { setState("error"); showProblem(error.message); return; }
  setState("uploading", "Uploading…");
  const { status, body } = await send(data);
  $("progress").hidden = true;
  if (status !== 200) {
    setState("error", "");
    showProblem(`${status} ${body?.title ?? ""}: ${body?.detail ?? "no detail"}`);
    return;
  }
  result = body;
  try {
    await show(result);
  } catch (error) {
    setState("error");
    showProblem(`The result arrived but could not be drawn (${error.message}); the tables and the download work.`);
    return;
  }
  setState("done", `Segmented with ${result.model} in ${(result.timing_ms.total / 1000).toFixed(1)} s.`);
}

// ------------------------------------------------------------------------------------------- showing
function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const cell of cells) { const td = document.createElement(tag); td.textContent = cell; tr.append(td); }
  return tr;
}

function tables(summary) {
  const volumes = $("volumes").tBodies[0];
  volumes.replaceChildren(...Object.entries(summary.volumes_ml).map(([region, ml]) => row([region, ml.toFixed(2)])));
  const scores = $("scores");
  scores.hidden = !summary.dice;
  if (summary.dice) {
    scores.tBodies[0].replaceChildren(...Object.keys(summary.dice).map((region) => row([region,
      summary.dice[region].toFixed(3), summary.hd95_mm[region] == null ? "-" : summary.hd95_mm[region].toFixed(1)])));
  }
  $("about").tBodies[0].replaceChildren(
    row(["model", `${summary.model} (${summary.model_sha256})`]), row(["on", summary.provider]),
    row(["shape", summary.shape.join(" × ")]), row(["voxel (mm)", summary.spacing_mm.map((v) => v.toFixed(2)).join(" × ")]),
    row(["postprocessed", String(summary.postprocessed)]), row(["TTA", $("tta").checked ? "on" : "off"]));
}

async function background(name) {
  const image = chosen("image");
  if (image) {
    return NVImage.loadFromFile({ file: image, name: "image.nii.gz", frame4D: MODALITIES.indexOf(name) });
  }
  return NVImage.loadFromFile({ file: chosen(name), name: `${name}.nii.gz` });
}

async function show(summary) {
  tables(summary);
  $("result").hidden = false;
  const select = $("background");
  if (!select.options.length) for (const m of MODALITIES) select.add(new Option(m.toUpperCase().replace("CE", "ce"), m));
  select.value = "t1ce";
  if (!viewer) {
    viewer = new Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: true, isColorbar: false,
      crosshairColor: [0.2, 0.6, 1, 0.8], crosshairWidth: 1 });
    await viewer.attachToCanvas($("viewer"));
    viewer.onLocationChange = (data) => { $("location").textContent = data.string ?? ""; };
  }
  await layers();
}

async function layers() {
  while (viewer.volumes.length) viewer.removeVolumeByIndex(0);
  viewer.addVolume(await background($("background").value));
  const mask = await NVImage.loadFromBase64({ base64: result.mask, name: "mask.nii.gz" });
  mask.setColormapLabel(LABEL_COLOURS);
  viewer.addVolume(mask);
  viewer.setSliceType(viewer.sliceTypeMultiplanar);
  viewer.setInterpolation(true);  // nearest neighbour: labels keep their edges
  centreOnTumour(mask);
  overlay();
}

function centreOnTumour(mask) {
  // The crosshair on the centre of the tumour (the mean of the mask's voxels, in mm), so that every view shows it.
  const [, nx, ny] = mask.hdr.dims;
  let count = 0, sx = 0, sy = 0, sz = 0;
  mask.img.forEach((value, index) => {
    if (!value) return;
    count++; sx += index % nx; sy += Math.floor(index / nx) % ny; sz += Math.floor(index / (nx * ny));
  });
  if (count) {
    const vox = [sx / count, sy / count, sz / count, 1];
    const mm = mask.hdr.affine.slice(0, 3).map((r) => r.reduce((sum, a, c) => sum + a * vox[c], 0));  // the file's affine
    viewer.scene.crosshairPos = viewer.mm2frac(mm);
    viewer.drawScene();
  }
}

function overlay() {
  if (viewer && viewer.volumes.length > 1) {
    viewer.setOpacity(1, $("overlay").checked ? Number($("opacity").value) : 0);
    viewer.drawScene();
  }
}

function download() {
  const bytes = Uint8Array.from(atob(result.mask), (c) => c.charCodeAt(0));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([bytes], { type: "application/gzip" }));
  link.download = "mask.nii.gz";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function reset() {
  for (const part of PARTS) input(part).value = "";
  showProblem("");
  setState("idle");
}

// ------------------------------------------------------------------------------------------- wiring
$("api-key").value = sessionStorage.getItem(KEY_STORE) ?? "";
$("api-key").addEventListener("change", () => { sessionStorage.setItem(KEY_STORE, $("api-key").value.trim()); loadModels(); });
$("segment").addEventListener("click", segment);
$("reset").addEventListener("click", reset);
$("download").addEventListener("click", download);
$("overlay").addEventListener("change", overlay);
$("opacity").addEventListener("input", overlay);
$("background").addEventListener("change", layers);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); assign([...event.dataTransfer.files]); });
setState("idle");
loadModels();
