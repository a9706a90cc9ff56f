// The viscpm page: a chat view and a paint view over the server's own OpenAI-compatible API.
// Plain JavaScript, no build step. Text from the model is always inserted as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], image: null, imagePending: false, busy: false, abort: null, models: {}, painting: null };

// -- helpers --------------------------------------------------------------------------------------

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// -- views ----------------------------------------------------------------------------------------

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".tab")) other.classList.toggle("active", other === tab);
    for (const view of ["chat", "paint"]) $("view-" + view).hidden = view !== tab.dataset.view;
  });
}

// -- chat -----------------------------------------------------------------------------------------

function addMessage(role, text, image) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "image 图片";
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.textContent = text;
  div.appendChild(span);
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return span;
}

function showImage(dataUrl) {
  state.image = dataUrl;
  state.imagePending = dataUrl !== null;  // sent with the next question
  $("image-preview").hidden = dataUrl === null;
  $("image-hint").hidden = dataUrl !== null;
  $("image-clear").hidden = dataUrl === null;
  if (dataUrl) $("image-preview").src = dataUrl; else $("image-preview").removeAttribute("src");
}

$("chat-image").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  try {
    showImage(await readFile(file));
    setStatus(`image: ${file.name}`);
  } catch (error) {
    setStatus("cannot read the image 无法读取图片: " + error, true);
  }
  event.target.value = "";  // choosing the same file again fires change again
});

// Removing the image also takes it out of the conversation, which then goes on as text only.
$("image-clear").addEventListener("click", () => {
  showImage(null);
  for (const message of state.messages) {
    if (Array.isArray(message.content)) message.content = message.content.filter((part) => part.type !== "image_url");
  }
});

function setBusy(busy) {
  state.busy = busy;
  $("chat-send").disabled = busy;
  $("chat-stop").hidden = !busy;
}

function resetChat() {
  if (state.abort) state.abort.abort();
  state.messages = [];
  showImage(null);
  $("chat-log").replaceChildren();
  setStatus("conversation cleared 已清空");
}

$("chat-reset").addEventListener("click", resetChat);
$("chat-stop").addEventListener("click", () => state.abort && state.abort.abort());

// Reads server-sent events from a fetch response; calls onData with each parsed JSON payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");  // {stream: true} keeps a character split across reads whole
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onData(JSON.parse(data));
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // closing the stream early stops the generation on the server
  }
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("chat-input").value.trim();
  if (!question || state.busy) return;
  const content = [{ type: "text", text: question }];
  const shownImage = state.imagePending ? state.image : null;
  if (shownImage) content.push({ type: "image_url", image_url: { url: shownImage } });
  const userMessage = { role: "user", content };
  addMessage("user", question, shownImage);
  $("chat-input").value = "";

  const answer = addMessage("assistant", "");
  answer.parentElement.classList.add("streaming");
  const request = { messages: [...state.messages, userMessage], stream: true,
                    max_tokens: numberOrNull("chat-max-tokens") || undefined };
  const temperature = numberOrNull("chat-temperature");
  if (temperature !== null) request.temperature = temperature;
  if ($("chat-language").value) request.language = $("chat-language").value;

  setBusy(true);
  setStatus("answering… 回答中…");
  state.abort = new AbortController();
  let text = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.abort.signal });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (data) => {
      if (data.error) throw new Error(data.error.message);
      const delta = data.choices && data.choices[0] && data.choices[0].delta;
      if (delta && delta.content) {
        text += delta.content;
        answer.textContent = text;
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
    });
    // the turn is kept only once answered, so a failed question can simply be asked again
    state.messages.push(userMessage, { role: "assistant", content: text });
    state.imagePending = false;
    setStatus("");
  } catch (error) {
    if (error.name === "AbortError") {
      if (text) state.messages.push(userMessage, { role: "assistant", content: text });
      state.imagePending = state.imagePending && !text;
      setStatus("stopped 已停止");
    } else {
      answer.parentElement.remove();
      addMessage("error", String(error.message || error));
      setStatus("error 出错", true);
    }
  } finally {
    answer.parentElement.classList.remove("streaming");
    answer.parentElement.classList.add("done");
    state.abort = null;
    setBusy(false);
  }
});

$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {  // isComposing: Chinese IME
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

// -- paint ----------------------------------------------------------------------------------------

function figureFor(item, prompt) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + item.b64_json;
  img.alt = prompt;
  const caption = document.createElement("figcaption");
  caption.textContent = `${prompt} — seed ${item.seed}` + (item.flagged ? " (flagged 已屏蔽)" : "");
  const link = document.createElement("a");
  link.href = img.src;
  link.download = `viscpm-${item.seed}.png`;
  link.textContent = " ⬇";
  caption.appendChild(link);
  figure.append(img, caption);
  return figure;
}

// The bar is indeterminate until the server reports the first denoising step (the request may wait
// in the queue, and the prompt is encoded first); the elapsed time runs throughout.
function showPaintProgress(job) {
  const seconds = Math.floor((performance.now() - job.started) / 1000);
  const bar = $("paint-bar");
  let text;
  if (job.step === null) {
    bar.removeAttribute("value");
    text = "starting 准备中";
  } else {
    bar.max = job.steps;
    bar.value = job.step;
    text = job.step < job.steps ? `step 步 ${job.step}/${job.steps}`
                                : `step 步 ${job.steps}/${job.steps}: decoding, checking 解码与检查`;
  }
  $("paint-progress-text").textContent = `${text} · ${seconds} s`;
}

function setPainting(job) {
  state.painting = job;
  $("paint-go").disabled = job !== null;
  $("paint-stop").hidden = job === null;
  $("paint-progress").hidden = job === null;
}

// Stop closes the stream, which cancels the painting on the server at its next step.
$("paint-stop").addEventListener("click", () => state.painting && state.painting.abort.abort());

$("paint-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (state.painting) return;
  const prompt = $("paint-prompt").value;
  const request = { prompt, n: numberOrNull("paint-n") || 1, response_format: "b64_json", stream: true,
                    size: $("paint-size").value.trim() || "auto", scheduler: $("paint-scheduler").value };
  const negative = $("paint-negative").value.trim();
  if (negative) request.negative_prompt = negative;
  for (const [field, id] of [["num_inference_steps", "paint-steps"], ["guidance_scale", "paint-guidance"],
                             ["seed", "paint-seed"]]) {
    const value = numberOrNull(id);
    if (value !== null) request[field] = value;
  }
  const job = { abort: new AbortController(), started: performance.now(), step: null, steps: null };
  setPainting(job);
  showPaintProgress(job);
  const clock = setInterval(() => showPaintProgress(job), 500);
  setStatus("painting… 绘制中…");
  try {
    // an image to edit goes as OpenAI's multipart form (edit.js); the browser sets its Content-Type
    const { "Content-Type": _, ...auth } = headers();
    const response = window.paintEdit.active()
      ? await fetch("/v1/images/edits", { method: "POST", headers: auth, body: await window.paintEdit.form(request),
                                          signal: job.abort.signal })
      : await fetch("/v1/images/generations", {
        method: "POST", headers: headers(), body: JSON.stringify(request), signal: job.abort.signal });
    if (!response.ok) throw new Error(await errorText(response));
    const images = [];
    await readEvents(response, (data) => {
      if (data.error) throw new Error(data.error.message);
      if (data.type === "image_generation.progress") {
        job.step = data.step;
        job.steps = data.num_steps;
        showPaintProgress(job);
      } else if (data.type === "image_generation.completed") {
        images.push(data);
      }
    });
    if (images.length === 0) throw new Error("the server sent no image 服务器未返回图片");
    $("gallery").prepend(...images.map((item) => figureFor(item, prompt)));  // newest call first
    setStatus("");
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("stopped 已停止");
    } else {
      const figure = document.createElement("figure");
      figure.className = "error";
      figure.textContent = String(error.message || error);
      $("gallery").prepend(figure);
      setStatus("error 出错", true);
    }
  } finally {
    clearInterval(clock);
    setPainting(null);
  }
});

// -- start ----------------------------------------------------------------------------------------

(async () => {
  $("api-key").value = localStorage.getItem("viscpm-api-key") || "";
  $("api-key").addEventListener("change", () => localStorage.setItem("viscpm-api-key", $("api-key").value));
  try {
    const health = await (await fetch("/health")).json();
    $("key-box").hidden = !health.auth_required;
    state.models = health.models;
    if (!health.models.chat) { $("tab-chat").disabled = true; $("tab-paint").click(); }
    if (!health.models.paint) $("tab-paint").disabled = true;
  } catch (error) {
    setStatus("server unreachable 无法连接服务器", true);
  }
})();
