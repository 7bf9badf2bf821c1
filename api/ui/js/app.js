// The page's start: sections as tabs (the URL's #hash), features this server has turned off, the API key dialog.

import { apiKey, config, forgetKey, saveKey, setKeyPrompt } from "./api.js";
import { initGallery } from "./gallery.js";
import { initGenerate } from "./generate.js";
import { initUploads } from "./upload.js";
import { initVoice } from "./voice.js";

const SECTIONS = ["images", "generate", "voice", "jobs"];

let current = null;

/** Show the section the #hash names. Another #hash (the skip link's #main) keeps the section shown. */
function showSection() {
  const wanted = location.hash.slice(1);
  if (SECTIONS.includes(wanted)) current = wanted;
  else if (!current || !wanted) current = "images";
  for (const name of SECTIONS) {
    document.getElementById(name).hidden = name !== current;
    const tab = document.querySelector(`[data-tab="${name}"]`);
    if (name === current) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  return current;
}

function markFeatures() {
  for (const [feature, on] of Object.entries(config.features)) {
    document.querySelectorAll(`[data-feature="${feature}"]`).forEach((node) => (node.hidden = !on));
    document.querySelectorAll(`[data-feature-off="${feature}"]`).forEach((node) => (node.hidden = on));
  }
}

/** Ask for a key in the dialog; resolves true when one was entered. Concurrent askers share one dialog. */
let asking = null;
function askForKey(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent =
    `${reason ? `${reason}. ` : ""}This server asks for an API key. It is kept in this tab only, until you close it.`;
  input.value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        asking = null;
        const key = input.value.trim();
        if (dialog.returnValue === "save" && key) {
          saveKey(key);
          resolve(true);
        } else {
          resolve(false);
        }
      },
      { once: true },
    );
  });
  dialog.returnValue = ""; // Escape closes without a value: never the last time's "save"
  dialog.showModal();
  return asking;
}

async function start() {
  markFeatures();
  setKeyPrompt(askForKey);
  window.addEventListener("hashchange", () => {
    showSection();
    document.getElementById("main").focus();
  });
  showSection();
  if (config.keys) {
    const button = document.getElementById("key-button");
    button.hidden = false;
    button.addEventListener("click", async () => {
      forgetKey();
      if (await askForKey("")) location.reload();
    });
    if (!apiKey()) await askForKey("");
  }
  if (config.features.index) {
    initGallery();
    initUploads();
  }
  if (config.features.image) initGenerate();
  if (config.features.voice) initVoice();
}

start().catch((error) => {
  const notice = document.getElementById("page-error");
  notice.textContent = `The page could not start: ${error.message}`;
  notice.hidden = false;
});
