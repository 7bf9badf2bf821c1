// The voice form: a reference clip (a file, or recorded here and sent as WAV), its transcript, the text to speak.

import { ApiError, config, errorFrom, pageUrl, parseJson, send } from "./api.js";
import { element, formatBytes, newId, showError } from "./dom.js";
import { addJob, followJob, updateJob } from "./jobs.js";

let recorded = null; // a File made from the last recording, used instead of the file input
let recorder = null;
let result = null; // the last MP3's object URL

export function initVoice() {
  const form = document.getElementById("voice-form");
  const language = form.elements.language;
  for (const name of config.languages) {
    language.append(element("option", { value: name, textContent: name === "auto" ? "Detect (auto)" : name }));
  }
  language.value = "auto";
  form.elements.text.maxLength = config.voice_max_text_chars;
  form.elements.ref_audio.addEventListener("change", () => {
    recorded = null;
    recordStatus("");
  });
  const record = document.getElementById("voice-record");
  if (!navigator.mediaDevices?.getUserMedia || !window.MediaRecorder) {
    record.disabled = true;
    record.title = "Recording needs a secure page (https or localhost) and a browser that records audio";
  }
  record.addEventListener("click", () => (recorder ? recorder.stop() : startRecording(record)));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    speak(form);
  });
  document.addEventListener("output-deleted", (event) => {
    const shown = document.getElementById("voice-result");
    if (shown.dataset.jobId !== event.detail.jobId) return;
    shown.hidden = true;
    document.getElementById("voice-audio").removeAttribute("src");
    if (result) URL.revokeObjectURL(result);
    result = null;
  });
}

function recordStatus(text) {
  document.getElementById("voice-record-status").textContent = text;
}

async function startRecording(button) {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    recordStatus(`The microphone is not available: ${error.message}`);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
  recorder.addEventListener("stop", async () => {
    stream.getTracks().forEach((track) => track.stop());
    recorder = null;
    button.textContent = "Record in the browser";
    try {
      const wav = await toWav(new Blob(chunks));
      recorded = new File([wav], "recording.wav", { type: "audio/wav" });
      document.getElementById("voice-ref").value = "";
      recordStatus(`Recorded ${formatBytes(recorded.size)}: it will be the reference clip`);
    } catch (error) {
      recordStatus(`The recording could not be read: ${error.message}`);
    }
  });
  recorder.start();
  button.textContent = "Stop recording";
  recordStatus("Recording… speak the transcript, then stop");
}

/** The recording as 16-bit mono PCM WAV (what the browser records, WebM or MP4, is decoded here first). */
async function toWav(blob) {
  const context = new AudioContext();
  try {
    const audio = await context.decodeAudioData(await blob.arrayBuffer());
    const samples = new Float32Array(audio.length);
    for (let channel = 0; channel < audio.numberOfChannels; channel++) {
      const data = audio.getChannelData(channel);
      for (let i = 0; i < data.length; i++) samples[i] += data[i] / audio.numberOfChannels;
    }
    const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
    const text = (offset, value) => [...value].forEach((char, i) => view.setUint8(offset + i, char.charCodeAt(0)));
    text(0, "RIFF");
    view.setUint32(4, 36 + samples.length * 2, true);
    text(8, "WAVEfmt ");
    view.setUint32(16, 16, true);
    view.setUint16(20, 1, true);
    view.setUint16(22, 1, true);
    view.setUint32(24, audio.sampleRate, true);
    view.setUint32(28, audio.sampleRate * 2, true);
    view.setUint16(32, 2, true);
    view.setUint16(34, 16, true);
    text(36, "data");
    view.setUint32(40, samples.length * 2, true);
    samples.forEach((sample, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, sample)) * 0x7fff, true));
    return view.buffer;
  } finally {
    context.close();
  }
}

async function speak(form) {
  const error = document.getElementById("voice-error");
  showError(error, null);
  const clip = recorded || form.elements.ref_audio.files[0];
  if (!clip) {
    showError(error, new Error("Choose a reference clip, or record one"));
    return;
  }
  if (clip.size > config.voice_max_ref_bytes) {
    const limit = formatBytes(config.voice_max_ref_bytes);
    showError(error, new Error(`The clip is ${formatBytes(clip.size)}; this server takes up to ${limit}`));
    return;
  }
  const body = new FormData();
  body.append("ref_audio", clip, clip.name);
  body.append("ref_text", form.elements.ref_text.value);
  body.append("text", form.elements.text.value);
  body.append("language", form.elements.language.value);
  const said = form.elements.text.value.trim();
  const label = `Speak “${said.length > 48 ? `${said.slice(0, 47)}…` : said}”`;
  const job = addJob({ label, type: "voice.generate", state: "running" });
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const response = await send("/v1/voice/generate", {
      method: "POST",
      body,
      headers: { Accept: "audio/mpeg", "Idempotency-Key": newId() },
    });
    if (!response.ok) throw await errorFrom(response);
    if (response.status === 202) {
      // the voice outlasted the server's wait: follow the job and play the stored MP3
      const accepted = parseJson(await response.text());
      updateJob(job, { jobId: accepted.job_id, state: accepted.status });
      const done = await followJob(job, accepted.status_url);
      play(pageUrl(done.result.url), done.result.duration_seconds, done.job_id, job);
    } else {
      const url = URL.createObjectURL(await response.blob());
      if (result) URL.revokeObjectURL(result);
      result = url;
      play(url, Number(response.headers.get("X-Audio-Duration")), response.headers.get("X-Job-Id"), job);
    }
  } catch (failure) {
    const shown = failure instanceof ApiError ? failure : new Error(failure.message);
    updateJob(job, { state: "failed", detail: shown.message });
    showError(error, shown);
  } finally {
    button.disabled = false;
  }
}

function play(url, seconds, jobId, job) {
  updateJob(job, { state: "succeeded", jobId, link: { href: url, text: "MP3" } });
  document.getElementById("voice-audio").src = url;
  document.getElementById("voice-link").href = url;
  document.getElementById("voice-caption").textContent = `${seconds.toFixed(1)} s of speech`;
  const shown = document.getElementById("voice-result");
  shown.dataset.jobId = jobId;
  shown.hidden = false;
}
