"""Recipes: one YAML file describes a whole job (convert -> uptrain -> eval -> bench -> report).

Every key has a default; a section's keys are the fields of that stage's config dataclass (ConvertConfig,
UptrainConfig, EvalConfig, BenchConfig) minus the ones the pipeline sets itself, so the recipe can never drift from
the stage functions. Unknown keys and values of the wrong type are one-line errors naming the key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..bench import QUICK, BenchConfig
from ..convert import ConvertConfig
from ..errors import BlockformerError
from ..eval.harness import EvalConfig
from ..uptrain import UptrainConfig
from ..uptrain.config import SynthConfig, step_budget

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = RECIPES / "smollm2-135m-cpu.yaml"

# Keys the pipeline fills in itself (models, output folders, resume flags), so a recipe cannot set them.
SET_BY_PIPELINE = {"source", "model", "baseline", "out", "overwrite", "resume", "extra", "data_dir", "role"}
SYNTH_DATA = "synth"  # uptrain.data naming the synth stage's teacher-written corpus: the stage runs only then

# Where a recipe's defaults differ from the stage's own defaults (the stage CLIs keep theirs).
RECIPE_DEFAULTS = {
    # 64 prompts at a time write twice as fast as 16 on a 2-core Zen 3, where the recipe must still fit in 30 min
    "synth": {"tokens": 32768, "batch_size": 64},
    # 24 of SmolLM2's 30 layers in the block decoder: LAMBADA above 0 and faster decoding (docs/recovery.md, "Where to split")
    # the block's other tokens at weight 0.3 in the embedder: lower perplexities at 16k and 64k (docs/recovery.md);
    # the original's layers 0-3 run inside each block after a learned sink: lower perplexities than 0-1 (and 0-1
    # than none) at 32k tokens, LAMBADA and WikiText-2 included (docs/recovery.md, "Four local layers"); their states
    # also feed the token decoder's inputs: held-out perplexity 72.4 against 80.1 at 32k (docs/recovery.md)
    "convert": {"dtype": "float32", "init": "contextual", "calib_tokens": 32768, "block_layers": 0.8,
                "embedder_mix": 0.3, "embedder_layers": 4, "embedder_sink": True, "local_token_inputs": True},
    # pure distillation on teacher-written text: lower WikiText-2 and LAMBADA perplexity at 16k and 64k tokens;
    # batch 4 kept: one row per step lowers perplexities but not LAMBADA accuracy at 32k (docs/recovery.md)
    "uptrain": {"data": SYNTH_DATA, "teacher": "source", "kd_weight": 1.0, "max_tokens": 32768, "seq_len": 256,
                "warmup_steps": 4, "eval_every": 8, "save_every": 8},
    "eval": {"limit": 50, "tasks": ["piqa", "arc_easy", "hellaswag", "lambada_openai"]},
    "bench": {"scenarios": {k: list(v) for k, v in QUICK.items()}, "repeats": 2, "device": "auto"},
}
STAGE_CONFIGS = {"convert": ConvertConfig, "synth": SynthConfig, "uptrain": UptrainConfig, "eval": EvalConfig, "bench": BenchConfig}


@dataclass
class Recipe:
    source: str = "default"         # the model to convert: folder, hub id, .gguf file, or 'default'
    out: str = "runs/smollm2-135m-cpu"
    data_dir: str | None = None     # tasks+corpus; None: $BLOCKFORMER_DATA_DIR, bundled, hub
    convert: dict = field(default_factory=dict)
    synth: dict = field(default_factory=dict)
    uptrain: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    bench: dict = field(default_factory=dict)
    path: str | None = None         # the file it was read from (not a key)

    def enabled(self, stage: str) -> bool:
        return getattr(self, stage).get("enabled", True)

    def options(self, stage: str) -> dict:
        """The stage's options without the pipeline's own switch."""
        return {k: v for k, v in getattr(self, stage).items() if k != "enabled"}


def section_defaults(stage: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(STAGE_CONFIGS[stage]) if f.name not in SET_BY_PIPELINE}
    # every later stage needs the conversion; synth runs exactly when uptrain.data asks for its corpus
    out = {} if stage in ("convert", "synth") else {"enabled": True}
    for name, f in fields.items():
        has = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        out[name] = f.default if f.default is not dataclasses.MISSING else f.default_factory() if has else None
    out.update(RECIPE_DEFAULTS.get(stage, {}))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}  # as YAML spells them


def resolve_recipe(spec: str | None) -> Path:
    """A path, or the bare name of a shipped recipe ('smollm2-135m-cpu'); None is the default recipe."""
    if spec is None:
        return DEFAULT_RECIPE
    p = Path(spec).expanduser()
    if p.exists():
        return p
    shipped = RECIPES / f"{spec.removesuffix('.yaml')}.yaml"
    if shipped.exists() and "/" not in spec:
        return shipped
    names = ", ".join(sorted(f.stem for f in RECIPES.glob("*.yaml")))
    raise BlockformerError(f"recipe {spec} not found (a YAML file, or one of the shipped recipes: {names})")


def load_recipe(spec: str | None) -> Recipe:
    import yaml
    path = resolve_recipe(spec)
    try:
        raw = yaml.load(read_text(path), Loader=unique_key_loader()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        why = str(getattr(e, "problem", None) or e).splitlines()[0]  # ReaderError spans lines: keep one
        raise BlockformerError(f"{path}{where}: not valid YAML ({why})") from e
    if not isinstance(raw, dict):
        raise BlockformerError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    return build(raw, path)


def unique_key_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping is an error: plain YAML keeps the last
    silently, so a recipe edited in one place could run with the value written in the other."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)
    return UniqueKeyLoader


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BlockformerError(f"{path}: cannot read the recipe ({e.strerror or e})") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BlockformerError(f"{path}: not a UTF-8 text file (byte {e.start}); a recipe is YAML text") from e


def build(raw: dict, path: Path) -> Recipe:
    top = {f.name for f in dataclasses.fields(Recipe)} - {"path"}
    unknown(path, "", raw, top)
    r = Recipe(path=str(path), **{k: v for k, v in raw.items() if k not in STAGE_CONFIGS})
    check_type(path, "source", r.source, "str")
    check_type(path, "out", r.out, "str")
    check_type(path, "data_dir", r.data_dir, "str | None")
    for stage in STAGE_CONFIGS:
        given = raw.get(stage) or {}
        if not isinstance(given, dict):
            raise BlockformerError(f"{path}: '{stage}' must be a mapping of options, got {given!r}")
        defaults = section_defaults(stage)
        unknown(path, f"{stage}.", given, set(defaults))
        merged = {**defaults, **given}
        if stage == "convert" and merged["layer_map"] != "partition" and "block_layers" not in given:
            merged["block_layers"] = None  # the recipe's share is a partition's; skip and duplicate fix their own
        for k, v in merged.items():
            check_type(path, f"{stage}.{k}", v, annotation(stage, k))
        setattr(r, stage, merged)
    for stage in STAGE_CONFIGS:
        check_values(path, stage, r.options(stage))
    check_budget(path, r)
    return r


# Stand-ins for the fields the pipeline fills in, so that a stage's config can be built (and checked) from a recipe.
PLACEHOLDERS = {"source": "<source>", "model": "<model>", "out": Path("<out>")}


def check_values(path: Path, stage: str, opts: dict) -> None:
    """The stage's own value checks (its config's `check()`/`__post_init__`), so recipes and the CLI share them."""
    cls = STAGE_CONFIGS[stage]
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}  # as the pipeline passes them
    try:
        ph = PLACEHOLDERS | ({"out": Path("<out>.jsonl")} if stage == "synth" else {})  # synth writes JSON lines
        cfg = cls(**{k: v for k, v in ph.items() if k in fields}, **given)
        check = getattr(cfg, "check", None)
        if callable(check):
            check()
    except BlockformerError as e:
        raise BlockformerError(f"{path}: {with_key(stage, str(e), fields)}") from e


def with_key(stage: str, msg: str, fields: set) -> str:
    """'--save-every must be ...' or 'save_every must be ...' -> 'uptrain.save_every must be ...' (the recipe's key)."""
    head = msg.split(" ", 1)[0]
    key = head.lstrip("-").replace("-", "_")
    return f"{stage}.{key}{msg[len(head):]}" if key.split(".")[0] in fields else f"{stage}: {msg}"


def budget_steps(u: dict, block_length: int) -> int | None:
    """Optimizer steps of an uptraining budget, counted as uptrain counts them (one process); None: time only."""
    seq = math.ceil(u["seq_len"] / block_length) * block_length   # uptrain rounds rows up to whole blocks
    return step_budget(u["max_steps"], u["max_tokens"], u["batch_size"] * u["grad_accum"] * seq)


def check_budget(path: Path, r: Recipe) -> None:
    """Warm-up must end and a checkpoint must be written within the budget, or the schedule silently degrades."""
    u = r.uptrain
    if not r.enabled("uptrain") or min(u["batch_size"], u["grad_accum"], u["seq_len"], r.convert["block_length"]) < 1:
        return  # not run, or the stage's own checks name the bad value
    steps = budget_steps(u, r.convert["block_length"])
    if steps is None:
        return  # a time budget alone: the step count depends on the machine
    if u["warmup_steps"] >= steps:
        raise BlockformerError(f"{path}: uptrain.warmup_steps ({u['warmup_steps']}) must be below the {steps} steps "
                               f"of the budget, or the learning rate never leaves warm-up")
    if u["save_every"] > steps:
        raise BlockformerError(f"{path}: uptrain.save_every ({u['save_every']}) must be at most the {steps} steps of "
                               f"the budget, or no checkpoint is written to resume from")


def unknown(path: Path, prefix: str, given: dict, known: set) -> None:
    for k in given:
        if k not in known:
            raise BlockformerError(f"{path}: unknown key '{prefix}{k}' (known: {', '.join(sorted(known))})")


def annotation(stage: str, key: str) -> str:
    if key == "enabled":
        return "bool"
    if stage == "bench" and key == "scenarios":
        return "dict"
    return str(next(f.type for f in dataclasses.fields(STAGE_CONFIGS[stage]) if f.name == key))


TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "Path": (str,),
         "tuple": (list, tuple), "dict": (dict,)}


def check_type(path: Path, key: str, value, ann: str) -> None:
    """Check a value against a dataclass annotation written as a string ('int | None', 'tuple[str, ...]')."""
    if value is None and "None" in ann:
        return
    parts = [p.strip() for p in ann.split("|")]
    if not is_a(value, parts):
        raise BlockformerError(f"{path}: '{key}' must be {ann}, got {value!r}")
    # annotations are strings, so a list's elements are checked here: 'tuple[str, ...]' -> each one a str
    item = next((p[len("tuple["):].split(",")[0].strip() for p in parts if p.startswith("tuple[")), None)
    if isinstance(value, (list, tuple)) and item in TYPES and not all(is_a(v, [item]) for v in value):
        raise BlockformerError(f"{path}: '{key}' must be a list of {item}, got {value!r}")


def is_a(value, parts: list[str]) -> bool:
    allowed = tuple(t for name, ts in TYPES.items() if any(p.startswith(name) for p in parts) for t in ts)
    return isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
