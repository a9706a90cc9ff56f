// Image editing on the paint view: start from an uploaded image, and optionally paint (or drag a
// rectangle over) the part to repaint. Painted pixels become the white of the mask sent to
// /v1/images/edits; with nothing painted the whole image is repainted by its strength.
"use strict";

const edit = { file: null, drawing: false, start: null, snapshot: null };

function maskContext() { return $("edit-mask").getContext("2d"); }

function pointOn(event) {
  const canvas = $("edit-mask");
  const box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas.width / box.width,
           y: (event.clientY - box.top) * canvas.height / box.height };
}

function dab(point) {
  const canvas = $("edit-mask");
  const radius = Number($("edit-brush").value) * canvas.width / canvas.getBoundingClientRect().width / 2;
  const ctx = maskContext();
  ctx.beginPath();
  ctx.arc(point.x, point.y, Math.max(radius, 0.5), 0, 2 * Math.PI);
  ctx.fill();
}

function clearMask() {
  const canvas = $("edit-mask");
  maskContext().clearRect(0, 0, canvas.width, canvas.height);
}

function hasMask() {
  const canvas = $("edit-mask");
  if (!edit.file || !canvas.width) return false;
  const alpha = maskContext().getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i]) return true;
  return false;
}

// the painted strokes as the mask the API reads: white = repaint, black = keep, at the image's size
function maskBlob() {
  const canvas = $("edit-mask");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const pixels = maskContext().getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const value = pixels.data[i + 3] ? 255 : 0;
    pixels.data.set([value, value, value, 255], i);
  }
  out.getContext("2d").putImageData(pixels, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

$("edit-image").addEventListener("change", () => {
  const file = $("edit-image").files[0];
  if (!file) return;
  const preview = $("edit-preview");
  preview.onload = () => {
    const canvas = $("edit-mask");
    canvas.width = preview.naturalWidth;
    canvas.height = preview.naturalHeight;
    maskContext().fillStyle = "rgb(255, 64, 64)";
    edit.file = file;
    $("edit-stage").hidden = $("edit-tools").hidden = false;
  };
  preview.src = URL.createObjectURL(file);
});

$("edit-mask").addEventListener("pointerdown", (event) => {
  edit.drawing = true;
  edit.start = pointOn(event);
  $("edit-mask").setPointerCapture(event.pointerId);
  if ($("edit-tool").value === "brush") dab(edit.start);
  else edit.snapshot = maskContext().getImageData(0, 0, $("edit-mask").width, $("edit-mask").height);
});

$("edit-mask").addEventListener("pointermove", (event) => {
  if (!edit.drawing) return;
  const point = pointOn(event);
  if ($("edit-tool").value === "brush") { dab(point); return; }
  maskContext().putImageData(edit.snapshot, 0, 0);  // the rectangle follows the pointer
  maskContext().fillRect(Math.min(edit.start.x, point.x), Math.min(edit.start.y, point.y),
                         Math.abs(point.x - edit.start.x), Math.abs(point.y - edit.start.y));
});

for (const type of ["pointerup", "pointercancel"]) {
  $("edit-mask").addEventListener(type, () => { edit.drawing = false; edit.snapshot = null; });
}

$("edit-clear-mask").addEventListener("click", clearMask);

$("edit-remove").addEventListener("click", () => {
  edit.file = null;
  $("edit-image").value = "";
  clearMask();
  $("edit-stage").hidden = $("edit-tools").hidden = true;
});

// what app.js asks: is an image being edited, and the multipart form for a paint request
window.paintEdit = {
  active: () => edit.file !== null,
  async form(request) {
    const form = new FormData();
    for (const [field, value] of Object.entries(request)) form.append(field, String(value));
    form.append("image", edit.file);
    if (hasMask()) form.append("mask", await maskBlob(), "mask.png");
    const strength = numberOrNull("edit-strength");
    if (strength !== null) form.append("strength", String(strength));
    return form;
  },
};
