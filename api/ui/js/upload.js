// Uploads: many files at once (picked or dropped), each with its own progress and its own error in words.

import { call, config, keyRefused, pageUrl, upload } from "./api.js";
import { element, formatBytes } from "./dom.js";
import { addImage } from "./gallery.js";
import { addJob, followJob, updateJob } from "./jobs.js";

const AT_ONCE = 3;
const waiting = [];
let running = 0;

export function initUploads() {
  const input = document.getElementById("upload-input");
  const zone = document.getElementById("dropzone");
  input.addEventListener("change", () => {
    queue([...input.files]);
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    queue([...event.dataTransfer.files]);
  });
}

function queue(files) {
  for (const file of files) {
    const row = uploadRow(file);
    if (file.size > config.image_max_bytes) {
      row.fail(`${formatBytes(file.size)} is over this server's limit of ${formatBytes(config.image_max_bytes)}`);
      continue;
    }
    waiting.push({ file, row });
  }
  pump();
}

function pump() {
  while (running < AT_ONCE && waiting.length) {
    const next = waiting.shift();
    running++;
    send(next.file, next.row).finally(() => {
      running--;
      pump();
    });
  }
}

async function send(file, row) {
  const job = addJob({ label: `Index ${file.name}`, type: "image.index", state: "uploading" });
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    let answer;
    for (let attempt = 0; ; attempt++) {
      try {
        answer = await upload("/v1/images?wait=true", form, (fraction) => row.progress(fraction));
        break;
      } catch (error) {
        if (attempt === 0 && (await keyRefused(error))) continue;
        throw error;
      }
    }
    let image = answer.body;
    if (answer.status === 202) {
      // indexing outlasted the server's wait: follow the job, then read the record
      row.state("Indexing…");
      updateJob(job, { state: "queued" });
      const done = await followJob(job, answer.body.status_url);
      ({ body: image } = await call(`/v1/images/${done.job_id}`));
    }
    // an API link opens in a new tab only when the server asks for no key
    const link = config.keys ? null : { href: pageUrl(image.file_url), text: "original" };
    updateJob(job, { state: "succeeded", jobId: image.id, link });
    row.done();
    addImage(image);
  } catch (error) {
    updateJob(job, { state: "failed", detail: error.message });
    row.fail(error.message);
  }
}

function uploadRow(file) {
  const bar = element("progress", { max: 1, value: 0 });
  bar.setAttribute("aria-label", `Upload of ${file.name}`);
  const state = element("span", { className: "upload-state", textContent: "Waiting…" });
  const row = element("li", { className: "upload" }, [
    element("span", { className: "upload-name", textContent: file.name }),
    element("span", { className: "upload-size", textContent: formatBytes(file.size) }),
    bar,
    state,
  ]);
  document.getElementById("uploads").prepend(row);
  return {
    progress(fraction) {
      bar.value = fraction;
      state.textContent = fraction < 1 ? `Uploading ${Math.round(fraction * 100)}%` : "Indexing…";
    },
    state(text) {
      state.textContent = text;
    },
    done() {
      bar.value = 1;
      row.classList.add("ok");
      state.textContent = "Indexed";
    },
    fail(message) {
      row.classList.add("failed");
      bar.remove();
      state.textContent = `Not added: ${message}`;
    },
  };
}
