"""`chatstack generate` (plain completion, for base models) and `chatstack chat` (a terminal chat).

    chatstack generate runs/x/base --prompt "Once upon a time" --max-new-tokens 50 --temperature 0
    chatstack generate runs/x/base --prompt "What is 7 times 6?" --few-shot examples.jsonl --cot \\
        --paths 8 --path-temperatures 0.5 0.9      # self-consistency: majority answer + vote share
    chatstack chat runs/x/sft --system "You are a helpful assistant."
    chatstack chat runs/smollm2 --quantize int8      # int8 weights for decoding (CPU), see chatstack/infer/quantize.py
    chatstack chat runs/smollm2 --quantize bf16      # bf16 weights for every product (CPU)
    printf 'Hi!\\nWhat is 2+2?\\n' | chatstack chat runs/x/sft       # piped: one user turn per line

The chat keeps the whole conversation as ChatML (system, user, assistant turns) and streams each reply.
Commands: /clear (forget the conversation, keep the system prompt), /system TEXT (set the system prompt;
/system alone shows it, "/system -" removes it), /image FILE (attach an image to the next message; a vision
model from `chatstack sft-vision` only), /quit. `--image FILE.png` attaches one to the first message:

    chatstack chat runs/vision --image digit.png       # then ask "What digit is this?" When the conversation no longer fits the model's
context, the oldest turns are dropped (the system prompt stays) and a note goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from chatstack.args import CLIError, add_dataclass_args
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.infer.prompting import (
    COT_TRIGGER,
    few_shot_messages,
    few_shot_prompt,
    load_examples,
    self_consistency,
)
from chatstack.model import ROPE_SCALINGS
from chatstack.vision.data import load_image
from chatstack.vision.vlm import load_vision, render_request

HELP = "commands: /clear  /system [TEXT | -]  /image FILE  /quit"


@dataclass
class SamplingArgs:
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens to generate per reply/completion"})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass (1.0 = off)"})
    rope_scaling: str = field(
        default="",
        metadata={
            "help": "RoPE scaling for a longer context (rope models): linear | ntk | yarn | none "
            "(default: what the checkpoint's config.json says)",
            "choices": ["", *ROPE_SCALINGS],
        },
    )
    rope_factor: float = field(
        default=1.0, metadata={"help": "with --rope-scaling: context = factor x the trained one"}
    )
    seed: Optional[int] = field(default=None, metadata={"help": "fixes the random draws (reproducible output)"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings (not printed)"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | mps"})
    stats: bool = field(
        default=False,
        metadata={
            "help": "after each completion/reply, print to stderr the time to "
            "the first token and the decode speed (tok/s)"
        },
    )
    prefix_cache_mb: float = field(
        default=256,
        metadata={
            "help": "keep finished replies' keys/values up to this "
            "many MB, so the next turn (or sample) prefills only "
            "what is new; 0 = off"
        },
    )
    quantize: str = field(
        default="",
        metadata={
            "help": "int8: decode with int8 weights (CPU; faster where decoding "
            "is bound by weight bytes: 1.25-1.65x on GPT-2 small); bf16: every "
            "product on bf16 weights (CPU; faster for batches); see "
            "chatstack/infer/quantize.py for the measured quality cost"
        },
    )


@dataclass
class GenerateArgs:
    prompt: str = field(default="", metadata={"help": "the text to continue (or the question, with --few-shot)"})
    num_samples: int = field(default=1, metadata={"help": "independent completions (seed, seed+1, ...)"})
    few_shot: str = field(
        default="", metadata={"help": "JSONL of {question, answer} examples: build a few-shot prompt"}
    )
    shots: int = field(default=0, metadata={"help": "how many of the --few-shot examples to use (0 = all)"})
    cot: bool = field(default=False, metadata={"help": 'end the prompt with "Let\'s think step by step."'})
    chat: bool = field(
        default=False,
        metadata={
            "help": "for chat (SFT) models: send the prompt as a ChatML user turn (few-shot examples as earlier turns)"
        },
    )
    system: str = field(default="", metadata={"help": "system prompt (with --chat)"})
    paths: int = field(
        default=0,
        metadata={
            "help": "self-consistency: sample N reasoning paths, print the majority answer and its vote share (0 = off)"
        },
    )
    path_temperatures: list[float] = field(
        default_factory=lambda: [0.7], metadata={"help": "temperatures the paths cycle through"}
    )


class StreamTimer:
    """Times one streamed completion: call tick() per token event, summary() at the end."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first: Optional[float] = None
        self.n = 0

    def tick(self):
        self.n += 1
        if self.first is None:
            self.first = time.perf_counter()

    def summary(self, n_prompt: int) -> str:
        if self.first is None:
            return f"({n_prompt} prompt tokens, no new token)"
        after = self.n - 1  # decode speed: tokens after the first (which includes the prefill)
        dt = time.perf_counter() - self.first
        rate = f", then {after / dt:.1f} tok/s" if after and dt > 0 else ""
        return f"({n_prompt} prompt tokens, {self.n} new: first after {(self.first - self.t0) * 1e3:.0f} ms{rate})"


def _engine(ck, args) -> Engine:
    if args.rope_scaling:
        try:
            ck.model.set_rope_scaling(args.rope_scaling, args.rope_factor)
        except ValueError as e:
            raise CLIError(f"--rope-scaling: {e}") from None
    try:
        engine = Engine(ck.model, ck.tokenizer, quantize=args.quantize or None, prefix_cache_mb=args.prefix_cache_mb)
    except ValueError as e:
        raise CLIError(str(e)) from None
    engine.prepare_weights()  # now, so --stats times the first reply like the others
    if args.stats and engine.cpu_matmul:
        print(
            f"(CPU products: {engine.cpu_matmul}; CHATSTACK_CPU_MATMUL=auto|mkl|onednn chooses, "
            f"see chatstack/infer/cpu.py)",
            file=sys.stderr,
        )
    return engine


def _load(path: str, device: str):
    try:
        ck = load_checkpoint(path, device=device)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    if ck.tokenizer is None:
        raise CLIError(f"{path}: checkpoint has no tokenizer.json")
    ck.model.eval()
    return ck


def _params(args, **over) -> SamplingParams:
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=list(args.stop or []),
    )
    kw.update(over)
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise CLIError(str(e)) from None


# ---- generate ---------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    if not args.prompt:
        raise CLIError("--prompt is required")
    ck = _load(args.checkpoint, args.device)
    tok = ck.tokenizer
    engine = _engine(ck, args)
    examples = []
    if args.few_shot:
        try:
            examples = load_examples(args.few_shot)
        except (OSError, ValueError) as e:
            raise CLIError(str(e)) from None
    if args.chat:
        ids = tok.render_prompt(few_shot_messages(examples, args.prompt, args.shots, args.system, args.cot))
    elif examples:
        ids = tok.encode(few_shot_prompt(examples, args.prompt, shots=args.shots, cot=args.cot))
    else:
        ids = tok.encode(args.prompt.rstrip() + " " + COT_TRIGGER if args.cot else args.prompt)
    try:
        engine.check_prompt(ids)
    except ValueError as e:
        raise CLIError(str(e)) from None
    # few-shot continuations must stop before the model invents the next question
    stop = list(args.stop or []) + (["\n\nQ:", "\nQ:"] if args.few_shot and not args.chat else [])
    if args.paths:
        r = self_consistency(
            engine,
            ids,
            paths=args.paths,
            temperatures=args.path_temperatures,
            max_new_tokens=args.max_new_tokens,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=stop,
        )
        for i, p in enumerate(r.paths):
            body = p["text"].strip().replace("\n", " ")
            print(f"[path {i + 1} T={p['temperature']:g}] answer={p['answer']!r}: {body}")
        n_votes = max(r.votes.values()) if r.votes else 0
        print(f"majority answer: {r.answer} (vote share {r.share:.2f}: {n_votes}/{args.paths} paths; votes {r.votes})")
        return 0
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        timer = StreamTimer()
        for ev in engine.stream(ids, _params(args, seed=seed, stop=stop)):
            timer.tick()
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.stats:
            sys.stdout.flush()
            print(timer.summary(len(ids)), file=sys.stderr)
    return 0


# ---- chat -------------------------------------------------------------------------------------------------
class ChatSession:
    """A conversation with the model: ChatML history, slash commands, context trimming."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        system: str = "",
        note: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
        stats: bool = False,
        adapter=None,
    ):
        self.engine, self.params, self.system, self.note = engine, params, system, note
        self.stats = stats  # note each reply's timing (StreamTimer) after it
        self.turns: list[dict] = []  # user/assistant messages (the system prompt is kept apart)
        self.adapter = adapter  # a vision model's encoder + projection (chatstack.vision), or None
        self.images: list = []  # the images of self.turns' image parts, in order
        self.pending: list = []  # images attached with /image, for the next user message

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def command(self, line: str) -> Optional[str]:
        """Handle a /command; returns "quit" to end the session, None otherwise."""
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return "quit"
        if cmd == "/clear":
            self.turns, self.images, self.pending = [], [], []
            self.note("(conversation cleared)")
        elif cmd == "/image":
            self.attach(rest.strip())
        elif cmd == "/system":
            if not rest.strip():
                self.note(f"(system prompt: {self.system!r})")
            else:
                self.system = "" if rest.strip() == "-" else rest.strip()
                self.note("(system prompt set)" if self.system else "(system prompt removed)")
        else:
            self.note(f"(unknown command {cmd}; {HELP})")
        return None

    def attach(self, path: str) -> bool:
        """/image FILE: decode the image now (so a bad file is said at once); it goes with the next message."""
        if self.adapter is None:
            self.note("(this model takes no images: it is text only; train a vision model with chatstack sft-vision)")
            return False
        if not path:
            self.note("(usage: /image FILE)")
            return False
        try:
            self.pending.append(load_image(path))
        except ValueError as e:
            self.note(f"({e})")
            return False
        self.note(f"(image attached: {path}; it goes with your next message)")
        return True

    @staticmethod
    def _n_images(turn: dict) -> int:
        c = turn["content"]
        return 0 if isinstance(c, str) else sum(1 for p in c if p.get("type") == "image")

    def _fit(self):
        """(prompt ids, image embeddings for the engine or None), dropping the oldest turns (and their images)
        until it fits with room to answer; None if it can't."""
        tok, limit = self.engine.tok, self.engine.block_size
        room = min(self.params.max_new_tokens, max(1, limit // 4))
        while True:
            ids, embeds = render_request(tok, self.adapter, self.messages(), self.images)
            if len(ids) + room <= limit or len(self.turns) <= 1:
                return (ids, embeds) if len(ids) < limit else None
            # drop the oldest user turn and the assistant reply that follows it
            drop = 2 if len(self.turns) > 2 else 1
            self.images = self.images[sum(self._n_images(t) for t in self.turns[:drop]) :]
            self.turns = self.turns[drop:]
            self.note("(context full: dropped the oldest turn)")

    def reply(self, user: str, on_text: Callable[[str], None] = lambda s: None) -> str:
        content = user
        if self.pending:  # the attached images go first, then the question (how sft-vision trains)
            content = [{"type": "image"}] * len(self.pending) + [{"type": "text", "text": user}]
        self.turns.append({"role": "user", "content": content})
        self.images += self.pending
        fit = self._fit()
        if fit is None:
            self.turns.pop()
            self.images = self.images[: len(self.images) - len(self.pending)] if self.pending else self.images
            self.note(f"(message too long for the model's context of {self.engine.block_size} tokens)")
            return ""
        self.pending = []
        ids, embeds = fit
        out = []
        timer = StreamTimer()
        try:
            for ev in self.engine.stream(ids, self.params, embeds=embeds):
                timer.tick()
                if ev.text:
                    out.append(ev.text)
                    on_text(ev.text)
        except KeyboardInterrupt:
            self.note("\n(interrupted)")  # keep what was said so far
        if self.stats:
            self.note("\n" + timer.summary(len(ids)))
        text = "".join(out)
        self.turns.append({"role": "assistant", "content": text})
        return text


def cmd_chat(args) -> int:
    ck = _load(args.checkpoint, args.device)
    engine = _engine(ck, args)
    try:
        adapter = load_vision(args.checkpoint, device=args.device)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    session = ChatSession(engine, _params(args), system=args.system, stats=args.stats, adapter=adapter)
    if args.image:
        if adapter is None:
            raise CLIError(
                f"--image: {args.checkpoint} is a text-only model (no image encoder); "
                f"train a vision model with chatstack sft-vision"
            )
        try:
            session.pending.append(load_image(args.image))
        except ValueError as e:
            raise CLIError(f"--image: {e}") from None
    interactive = sys.stdin.isatty()

    def write(s):
        sys.stdout.write(s)
        sys.stdout.flush()

    if interactive:
        print(f"chatstack chat: {ck.path} ({HELP})", file=sys.stderr)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break  # end of piped input
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if session.command(line) == "quit":
                break
            continue
        if interactive:
            write("assistant> ")
        session.reply(line, on_text=write)
        write("\n")
    return 0


def register(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="continue a text prompt (base models); few-shot and self-consistency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("checkpoint", help="checkpoint directory")
    add_dataclass_args(g, GenerateArgs, group="prompt")
    add_dataclass_args(g, SamplingArgs, group="sampling")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "chat",
        help="chat in the terminal (ChatML, streaming); reads turns from stdin when piped",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("checkpoint", help="checkpoint directory")
    c.add_argument("--system", default="", help="system prompt")
    c.add_argument(
        "--image",
        default="",
        help="an image file (PNG, JPEG, ...) to attach to the first message (vision models from chatstack sft-vision)",
    )
    add_dataclass_args(c, SamplingArgs, group="sampling")
    c.set_defaults(func=cmd_chat)
