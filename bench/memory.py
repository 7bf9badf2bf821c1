"""Memory per process kind: what an API process holds for search (the CLIP text tower) against what an indexing
processor holds (both towers), with the default CLIP at its real size (random weights: no download needed).

    .venv/bin/python bench/memory.py [--model ViT-B-16-SigLIP2-256]

Each figure comes from a fresh child process: its resident set size (RSS) after importing what that kind of
process imports, then after building the model, then (API) after dropping the image tower the way
ClipEmbedder.load(image_tower=False) does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from infra.settings import DEFAULT_CLIP_MODEL

_CHILD = r"""
import gc, json, sys
def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
kind, name = sys.argv[1], sys.argv[2]
if kind == "api":
    import api.app, api.services  # noqa: F401  what `python -m api` imports
else:
    import processor.service  # noqa: F401  what `python -m processor` imports
import open_clip, torch
torch.set_num_threads(1)
imported = rss_mb()
model = open_clip.create_model(name, pretrained=None)
model.eval()
loaded = rss_mb()
params = sum(p.numel() for p in model.parameters())
if kind == "api":
    model.visual = None
    gc.collect()
kept = rss_mb()
text = sum(p.numel() for p in model.parameters())
modules = sorted({m.split(".")[0] for m in sys.modules} & {"diffusers", "qwen_tts"})
report = {"imported": imported, "loaded": loaded, "kept": kept, "params": params, "kept_params": text,
          "modules": modules}
sys.stdout.write(json.dumps(report) + "\n")
"""


def measure(kind: str, model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, model], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_CLIP_MODEL, help="open_clip model name (default: %(default)s)")
    args = parser.parse_args()
    api, processor = measure("api", args.model), measure("processor", args.model)
    rows = [
        ("API alone (text tower)", api),
        ("indexing processor (both towers)", processor),
    ]
    lines = [
        f"model {args.model}, random weights, float32, CPU",
        "",
        "| process | RSS after imports | RSS with the model | parameters held | diffusers / qwen_tts imported |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows:
        modules = ", ".join(row["modules"]) or "no"
        held = f"{row['kept_params'] / 1e6:.0f} M"
        lines.append(f"| {label} | {row['imported']:.0f} MB | {row['kept']:.0f} MB | {held} | {modules} |")
    model_api = api["kept"] - api["imported"]
    model_processor = processor["kept"] - processor["imported"]
    lines += [
        "",
        f"the model's share: API {model_api:.0f} MB, processor {model_processor:.0f} MB "
        f"({model_api / model_processor:.0%} of it)",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
