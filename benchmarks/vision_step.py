"""One `sft-vision` training step (forward, backward, AdamW) in the ways its batch can be laid out.

The same 32 conversations per step, the default model (the tiny GPT, 17 image tokens per image, the default
image encoder, frozen) under four layouts, interleaved step by step so the machine's noise hits all alike:

- `one-per-row, full logits`: one conversation per row, the output layer at every position (the GPT's own loss);
- `one-per-row`: the output layer at the answer tokens only (what VisionChatModel does with targets);
- `packed 256` / `packed 128`: conversations packed into rows of that many tokens, positions restarting and
  attention kept inside each (chatstack.vision.chat_data.collate; 128 is the default).

Prints the median seconds per step with the range, and each layout's ratio to the first. Random weights: the
time does not depend on them. The tokenizer is any chatstack tokenizer with the chat tokens (the speedrun's).

    python benchmarks/vision_step.py --tokenizer runs/speedrun/tokenizer
    python benchmarks/vision_step.py --tokenizer runs/speedrun/tokenizer --threads 2 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from chatstack.infer.cpu import cpu_vendor
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.tokenizer import Tokenizer
from chatstack.vision.chat_data import TrainExamples, collate
from chatstack.vision.projection import VisionAdapter, VisionConfig
from chatstack.vision.vlm import VisionChatModel, place_images

LAYOUTS = ["one-per-row, full logits", "one-per-row", "packed 256", "packed 128"]


def step(m: VisionChatModel, opt: torch.optim.Optimizer, b: dict, full_logits: bool) -> None:
    keys = ["idx", "targets", "images", "img_row", "img_start"]
    if full_logits:  # what the GPT's forward does with targets: logits (B, T, V) everywhere, then the loss
        x = place_images(m.gpt.tok_emb(b["idx"]), m.vision(b["images"]), b["img_row"], b["img_start"])
        _, loss = m.gpt(b["idx"], b["targets"], embeds=x)
    else:
        _, loss = m(*[b[k] for k in keys], b.get("positions"), b.get("attn_mask"))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="runs/speedrun/tokenizer", help="a chatstack tokenizer directory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="steps per layout (the first two are warm-up)")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    if not (Path(a.tokenizer) / "tokenizer.json").exists():
        raise SystemExit(f"--tokenizer: {a.tokenizer}/tokenizer.json not found (run `chatstack speedrun` first)")
    torch.set_num_threads(a.threads)
    tok = Tokenizer.load(a.tokenizer)
    gpt = GPT(get_preset("tiny", vocab_size=tok.vocab_size, block_size=256))
    adapter = VisionAdapter(VisionConfig(n_embd=gpt.config.n_embd, image_tokens=16, global_token=True, coords=True))
    m = VisionChatModel(gpt, adapter)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    examples = TrainExamples(0, 0.25, {"position": 3, "where": 1})
    times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    shapes: dict[str, tuple] = {}
    for s in range(a.steps):
        exs = [examples(s * a.batch_size + i) for i in range(a.batch_size)]
        for name in LAYOUTS:
            t0 = time.perf_counter()
            packed = name.startswith("packed")
            row = int(name.split()[-1]) if packed else 128
            b = collate(exs, tok, adapter.image_tokens, 256, packed=packed, row_len=row)
            step(m, opt, b, name.endswith("full logits"))
            if s >= 2:
                times[name].append(time.perf_counter() - t0)
            shapes[name] = tuple(b["idx"].shape)
    print(f"{cpu_vendor()}, {a.threads} thread(s), {a.batch_size} conversations per step, {a.steps - 2} steps each")
    base = statistics.median(times[LAYOUTS[0]])
    for name in LAYOUTS:
        t = times[name]
        med = statistics.median(t)
        print(
            f"{name:26s} {med:.3f} s/step [{min(t):.3f}, {max(t):.3f}]  rows x T e.g. {shapes[name]}  {base / med:.2f}x"
        )


if __name__ == "__main__":
    main()
