// The generate form: an image.generate job, followed in the jobs panel; the PNG and the seed used shown here.

import { config, pageUrl, postJson, seedValue } from "./api.js";
import { showError } from "./dom.js";
import { addJob, followJob, updateJob } from "./jobs.js";

export function initGenerate() {
  const form = document.getElementById("generate-form");
  form.elements.width.value = config.default_width;
  form.elements.height.value = config.default_height;
  form.elements.steps.value = config.default_steps;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate(form);
  });
  document.addEventListener("output-deleted", (event) => {
    const figure = document.getElementById("generate-result");
    if (figure.dataset.jobId !== event.detail.jobId) return;
    figure.hidden = true;
    document.getElementById("generate-image").removeAttribute("src");
  });
}

function parameters(form) {
  const fields = form.elements;
  const params = {
    prompt: fields.prompt.value.trim(),
    width: Number(fields.width.value),
    height: Number(fields.height.value),
    steps: Number(fields.steps.value),
  };
  const negative = fields.negative_prompt.value.trim();
  if (negative) params.negative_prompt = negative;
  if (fields.seed.value !== "") params.seed = seedValue(fields.seed.value);
  return params;
}

async function generate(form) {
  const error = document.getElementById("generate-error");
  const button = form.querySelector("button[type=submit]");
  showError(error, null);
  const params = parameters(form);
  button.disabled = true;
  let accepted;
  try {
    ({ body: accepted } = await postJson("/v1/jobs", { type: "image.generate", params }));
  } catch (failure) {
    showError(error, failure);
    return;
  } finally {
    button.disabled = false;
  }
  const short = params.prompt.length > 48 ? `${params.prompt.slice(0, 47)}…` : params.prompt;
  const job = addJob({ label: `Generate “${short}”`, type: "image.generate", state: accepted.status });
  updateJob(job, { jobId: accepted.job_id });
  try {
    const done = await followJob(job, accepted.status_url);
    const result = { ...done.result, url: pageUrl(done.result.url) };
    updateJob(job, { link: { href: result.url, text: "PNG" } });
    show(result, done.job_id);
  } catch (failure) {
    updateJob(job, { state: "failed", detail: failure.message });
    showError(error, failure);
  }
}

function show(result, jobId) {
  const figure = document.getElementById("generate-result");
  figure.dataset.jobId = jobId;
  const image = document.getElementById("generate-image");
  image.src = result.url;
  image.width = result.width;
  image.height = result.height;
  document.getElementById("generate-caption").textContent =
    `Seed ${result.seed} · ${result.width} × ${result.height} · ${result.steps} steps`;
  const link = document.getElementById("generate-link");
  link.href = result.url;
  link.download = `generated-${result.seed}.png`;
  figure.hidden = false;
}
