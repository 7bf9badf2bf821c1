// The jobs panel: every job started from this page, its state as the server reports it, and a link to its result;
// a job still queued can be cancelled, and a generation's output deleted (the page then stops showing it).

import { ApiError, call, pageUrl } from "./api.js";
import { element } from "./dom.js";

const STATES = {
  uploading: "Uploading",
  queued: "Queued",
  running: "Running",
  succeeded: "Done",
  failed: "Failed",
};
const ACTIVE = new Set(["uploading", "queued", "running"]);
// the jobs whose output can be deleted (DELETE /v1/jobs/{id}/output), and what that output is called
const OUTPUTS = { "image.generate": "PNG", "voice.generate": "MP3" };
// each status request after the first is a long poll: the server answers when the job's status changes
const LONG_POLL_SECONDS = 25;

const jobs = [];
const list = document.getElementById("jobs-list");
const empty = document.getElementById("jobs-empty");
const badge = document.getElementById("jobs-badge");
const confirmOutput = document.getElementById("confirm-output-delete");
let deleting = null; // the entry whose output the confirmation asks about

confirmOutput.addEventListener("close", () => {
  if (confirmOutput.returnValue === "delete" && deleting) deleteOutput(deleting);
  deleting = null;
});

/** A new entry at the top of the panel: {label, type, state}; returns it for `updateJob`. */
export function addJob({ label, type, state = "queued" }) {
  const entry = {
    label, type, state, jobId: null, detail: "", link: null, outputDeleted: false, started: new Date(), node: null,
  };
  entry.node = element("li", { className: "job" });
  jobs.unshift(entry);
  list.prepend(entry.node);
  render(entry);
  return entry;
}

export function updateJob(entry, changes) {
  Object.assign(entry, changes);
  render(entry);
}

/**
 * Follow a job's status URL until it finishes (long polls: `?wait_seconds=`); the entry follows the server's state.
 * Resolves with the job (its `result`) when it succeeded; rejects with an ApiError carrying the job's own error
 * when it failed.
 */
export async function followJob(entry, statusUrl) {
  let seen = null; // the status of the last answer: the next long poll waits while the job is still in it
  for (;;) {
    const url = new URL(pageUrl(statusUrl), location.href);
    if (seen) {
      url.searchParams.set("wait_seconds", String(LONG_POLL_SECONDS));
      url.searchParams.set("while_status", seen);
    }
    let job;
    try {
      ({ body: job } = await call(url.href));
    } catch (error) {
      // the server unreachable, busy or asking this page to slow down (429): the job runs on; ask again later
      if (error.status === 0 || error.status === 503 || error.status === 429) {
        updateJob(entry, { detail: `${error.message}; still trying` });
        await sleep(retryDelay(error.retryAfter));
        continue;
      }
      throw error;
    }
    seen = job.status;
    updateJob(entry, { state: job.status, jobId: job.job_id, detail: "" });
    if (job.status === "succeeded") return job;
    if (job.status === "failed") {
      const error = job.error || { code: "failed", message: "the job failed" };
      throw new ApiError(422, error.code, error.message);
    }
  }
}

/** Ask the server to cancel a queued job; the job's own poll then sees it failed with the code `cancelled`. */
async function cancel(entry) {
  try {
    await call(`/v1/jobs/${entry.jobId}/cancel`, { method: "POST" });
  } catch (error) {
    updateJob(entry, { detail: error.message });
  }
}

function askToDeleteOutput(entry) {
  deleting = entry;
  document.getElementById("confirm-output-title").textContent = `Delete the ${OUTPUTS[entry.type]}?`;
  document.getElementById("confirm-output-text").textContent =
    `The server deletes the ${OUTPUTS[entry.type]} of ${entry.label} now; the job stays, saying so. ` +
    "This cannot be undone.";
  confirmOutput.returnValue = ""; // Escape closes without a value: never the last confirmation's
  confirmOutput.showModal();
}

/** Delete a finished generation's output on the server; the sections showing it stop (event `output-deleted`). */
async function deleteOutput(entry) {
  try {
    await call(`/v1/jobs/${entry.jobId}/output`, { method: "DELETE" });
  } catch (error) {
    updateJob(entry, { detail: error.message });
    return;
  }
  updateJob(entry, { link: null, outputDeleted: true, detail: `${OUTPUTS[entry.type]} deleted` });
  document.dispatchEvent(new CustomEvent("output-deleted", { detail: { jobId: entry.jobId } }));
}

/** Milliseconds to wait before asking again: the answer's Retry-After (seconds), else 2 s. */
function retryDelay(retryAfter) {
  const seconds = Number(retryAfter);
  return Number.isFinite(seconds) && seconds > 0 ? Math.min(seconds, 120) * 1000 : 2000;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function render(entry) {
  const node = entry.node;
  node.className = `job state-${entry.state}`;
  const parts = [
    element("span", { className: "job-state", textContent: STATES[entry.state] || entry.state }),
    element("span", { className: "job-label", textContent: entry.label }),
    element("time", {
      dateTime: entry.started.toISOString(),
      textContent: entry.started.toLocaleTimeString(),
    }),
  ];
  if (entry.link) {
    parts.push(element("a", { href: entry.link.href, textContent: entry.link.text, target: "_blank", rel: "noopener" }));
  }
  if (entry.jobId) {
    parts.push(element("code", { className: "job-id", textContent: entry.jobId, title: "job id" }));
  }
  if (entry.jobId && entry.state === "queued") {
    const label = `Cancel ${entry.label}`;
    const onclick = () => cancel(entry);
    parts.push(
      element("button", { type: "button", className: "job-cancel", textContent: "Cancel", ariaLabel: label, onclick }),
    );
  }
  if (entry.jobId && entry.state === "succeeded" && OUTPUTS[entry.type] && !entry.outputDeleted) {
    const label = `Delete the ${OUTPUTS[entry.type]} of ${entry.label}`;
    const onclick = () => askToDeleteOutput(entry);
    parts.push(
      element("button", { type: "button", className: "job-delete danger", textContent: "Delete…", ariaLabel: label, onclick }),
    );
  }
  if (entry.detail) {
    parts.push(element("p", { className: "job-detail", textContent: entry.detail }));
  }
  node.replaceChildren(...parts);
  const active = jobs.filter((job) => ACTIVE.has(job.state)).length;
  badge.hidden = active === 0;
  badge.textContent = String(active);
  badge.setAttribute("aria-label", `${active} running`);
  empty.hidden = jobs.length > 0;
}
