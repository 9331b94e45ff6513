// stepfleet playground: one generation at a time, streamed; the fleet panel polled.
// No framework, no build step: the router serves this file as it is.
"use strict";

const $ = (id) => document.getElementById(id);
// What happened, in order, for people debugging and for the browser test.
const log = { events: [], partialsShownAtFinal: null };
window.playground = log;

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function request() {
  const body = { prompt: $("prompt").value, size: $("size").value, n: Number($("n").value || 1),
                 quality: $("quality").value, output_format: $("output_format").value };
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  if (num("steps") !== null) body.num_inference_steps = num("steps");
  if (num("seed") !== null) body.seed = num("seed");
  if (num("guidance") !== null) body.guidance_scale = num("guidance");
  const stream = $("stream").checked && body.n === 1;
  if (stream) {
    body.stream = true;
    body.partial_images = Number($("partial_images").value);
  }
  return body;
}

function imageOf(b64, format) {
  const img = new Image();
  img.src = `data:image/${format || "png"};base64,${b64}`;
  return img;
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function showFinal(images, format, preview) {
  const box = $("final");
  box.className = "";
  box.replaceChildren(...images.map((b64) => {
    const img = imageOf(b64, format);
    if (preview) img.className = "preview";
    else img.dataset.final = "1";
    return img;
  }));
}

function addPartial(event, seconds) {
  const fig = document.createElement("figure");
  const img = imageOf(event.b64_json, event.output_format);
  img.dataset.index = event.partial_image_index;
  fig.append(img, `#${event.partial_image_index + 1} · ${seconds.toFixed(2)} s`);
  $("partials").append(fig);
  showFinal([event.b64_json], event.output_format, true);  // the stage previews it until the image is done
}

function describe(body, seconds, first) {
  const usage = body.usage ? `, ${body.usage.total_tokens.toLocaleString()} tokens` : "";
  const firstText = first === null ? "" : `first partial ${first.toFixed(2)} s, `;
  $("timing").textContent = `${firstText}final image ${seconds.toFixed(2)} s · ${body.size}, quality ${body.quality}${usage}`;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? `${body.error.message}` : `HTTP ${response.status}`;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

// Server-Sent Events from a fetch body: blocks separated by a blank line, `event:` and `data:` lines.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { type, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function generate(ev) {
  ev.preventDefault();
  const body = request();
  $("generate").disabled = true;
  $("partials").replaceChildren();
  $("timing").textContent = "";
  log.events = [];
  log.partialsShownAtFinal = null;
  setStatus(body.stream ? "streaming…" : "generating…");
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  try {
    const response = await fetch("/v1/images/generations", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorText(response));
    if (!body.stream) {
      const done = await response.json();
      log.events.push({ type: "completed", t: elapsed() });
      showFinal(done.data.map((d) => d.b64_json), done.output_format, false);
      describe(done, elapsed(), null);
    } else {
      let first = null;
      for await (const event of sseEvents(response)) {
        log.events.push({ type: event.type, t: elapsed() });
        if (event.type === "error") throw new Error(event.data.error ? event.data.error.message : "stream failed");
        if (event.type.endsWith(".partial_image")) {
          if (first === null) first = elapsed();
          addPartial(event.data, elapsed());
          setStatus(`partial image ${event.data.partial_image_index + 1} of ${body.partial_images}…`);
        } else if (event.type.endsWith(".completed")) {
          log.partialsShownAtFinal = document.querySelectorAll("#partials img").length;
          showFinal([event.data.b64_json], event.data.output_format, false);
          describe(event.data, elapsed(), first);
        }
      }
    }
    setStatus("done");
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    $("generate").disabled = false;
  }
}

function cell(text) {
  const td = document.createElement("td");
  if (text instanceof Node) td.append(text);
  else td.textContent = text;
  return td;
}

function renderFleet(fleet) {
  const mode = fleet.mode || "unknown";
  $("mode").textContent = `mode ${mode}`;
  $("mode").className = `badge ${mode}`;
  $("pools").tBodies[0].replaceChildren(...fleet.pools.map((p) => {
    const tr = document.createElement("tr");
    tr.dataset.pool = p.name;
    const weight = document.createElement("span");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(p.share * 60)}px`;
    weight.append(bar, `${(p.share * 100).toFixed(0)} %`);
    tr.append(cell(p.name), cell(`${p.ready}/${p.workers}`), cell(weight), cell(p.accelerator || "–"),
              cell(p.price_per_hour == null ? "–" : p.price_per_hour.toFixed(2)), cell(String(p.inflight)));
    return tr;
  }));
  const list = $("decisions");
  if (!fleet.decisions.length) {
    list.replaceChildren(Object.assign(document.createElement("li"), { className: "muted", textContent: "none yet" }));
  } else {
    list.replaceChildren(...fleet.decisions.map((d) => {
      const li = document.createElement("li");
      const when = d.at ? new Date(d.at * 1000).toLocaleTimeString() : "";
      const replicas = Object.entries(d.replicas).map(([k, v]) => `${k}×${v}`).join(", ");
      const head = document.createElement("div");
      head.innerHTML = "";
      head.append(Object.assign(document.createElement("b"), { textContent: d.mode || "" }), ` ${replicas} `,
                  Object.assign(document.createElement("span"), { className: "when", textContent: when }));
      const reasons = document.createElement("ul");
      reasons.append(...d.reasons.map((r) => Object.assign(document.createElement("li"), { textContent: r })));
      li.append(head, reasons);
      return li;
    }));
  }
  $("fleet-status").textContent = `service ${fleet.service || "–"}, model ${fleet.model || "–"} · updated ${new Date().toLocaleTimeString()}`;
}

async function pollFleet() {
  try {
    const response = await fetch("/v1/fleet", { headers: headers(false) });
    if (!response.ok) throw new Error(await errorText(response));
    renderFleet(await response.json());
  } catch (err) {
    $("fleet-status").textContent = `fleet: ${err.message}`;
  }
}

$("form").addEventListener("submit", generate);
pollFleet();
setInterval(pollFleet, 2000);
