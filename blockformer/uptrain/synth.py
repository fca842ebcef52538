"""Teacher-written training text: the original model writes a corpus (articles, stories, how-tos) to distil on.

    blockformer synth default --out data/teacher.jsonl --tokens 65536
    blockformer synth out/tiny-original --out /tmp/t.jsonl --tokens 200 --batch-size 4 --max-new-tokens 16  # tiny

Why: distillation transfers what the teacher does on the text it is shown, and the only text bundled here is eight
nineteenth-century books, far from what the benchmarks ask. A user often has no copy of the pretraining data
either. Text the teacher writes itself is in its own distribution (LLM-QAT, Liu et al. 2023, distils quantised
models on it for the same reason), and a mix of kinds (expository, narrative, procedural) covers more of what the
model is used for than one. The prompts are short generic topics written here by hand, none taken from an
evaluation set. Instruction-tuned models (a chat template) are asked to write; base models continue a heading.
Sampling is seeded per batch, so the same command writes the same file.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import sources
from ..errors import BlockformerError
from ..eval.scoring import resolve_max_length
from ..io import atomic_write_text
from .config import SynthConfig

ARTICLE = ("the Roman Empire, photosynthesis, the French Revolution, volcanoes, the human heart, jazz, the Moon, "
           "World War I, electricity, the Amazon rainforest, ancient Egypt, the printing press, black holes, football, "
           "the Industrial Revolution, DNA, the Great Wall of China, Shakespeare, climate, the Olympic Games, "
           "computers, the ocean, Mount Everest, the Renaissance, vaccines, the solar system, chess, the Nile, "
           "democracy, the telephone, dinosaurs, the Cold War, bees, Beethoven, railways, earthquakes, Mars, coffee, "
           "the internet, glaciers, the Silk Road, penguins, the American Civil War, mathematics, the violin, Japan, "
           "the Sahara, airplanes, the brain, rice, the Vikings, hurricanes, Paris, wolves, the Aztecs, Isaac Newton, "
           "television, whales, bridges, the immune system, gravity, the water cycle, ancient Greece, the steam "
           "engine, magnetism, rainbows, the Mongol Empire, antibiotics, the periodic table, coral reefs, the "
           "microscope, India, the Byzantine Empire, bread, the bicycle, forests, sound, the Arctic, Mozart, cotton, "
           "the camera, money, castles, the human skeleton, cheese, tides, the Great Depression, light, elephants, "
           "libraries, the Moon landing, salt, windmills, the stock market, sharks, batteries").split(", ")
STORY = ("a lighthouse keeper during a storm, a lost dog finding its way home, two friends on a fishing trip, a girl "
         "who builds a robot, a baker who wakes up late, a knight afraid of the dark, a boy who finds a map, a "
         "farmer and a dry summer, a detective and a missing necklace, a cat that travels by train, an old man "
         "planting a tree, a sailor far from home, a family moving to a new town, a village festival, a teacher on "
         "her last day, a mouse in a library, a runner before a race, a king who cannot sleep, a letter that "
         "arrives fifty years late, a snowstorm in the mountains, twins who switch places, a musician who loses "
         "his voice, a fox and a crow, a girl learning to swim, a stolen bicycle, a night in a museum, a "
         "grandmother's recipe, a shipwreck, a dragon who likes books, a boy and his grandfather fixing a car, a "
         "nurse on a night shift, a lost key, a birthday surprise, a soldier coming home, a market day, two "
         "rivals who become friends, a haunted house, the first day at a new school, a journey across the desert, "
         "a painter who cannot find the right colour").split(", ")
HOWTO = ("clean a cast iron pan, plant tomatoes, change a bicycle tyre, make bread, tie a tie, paint a wall, boil an "
         "egg, wash a wool sweater, build a campfire, sharpen a knife, fold a paper plane, remove a stain from a "
         "shirt, keep cut flowers fresh, make a cup of tea, pack a suitcase, hang a picture, start a garden, fix a "
         "squeaky door, make pancakes, clean windows without streaks, store fresh herbs, unclog a sink, brush a "
         "dog, iron a shirt, make a budget, learn to juggle, sew on a button, cook rice, wrap a present, clean "
         "shoes, carve a pumpkin, make lemonade, chop an onion, train a puppy, save energy at home, open a stuck "
         "jar, make a bird feeder, dry clothes indoors, keep bread fresh, patch a hole in a wall").split(", ")
KINDS = {  # kind -> (topics, chat request, base-model heading); the names are config.SYNTH_KINDS
    "article": (ARTICLE, "Write an encyclopedia article about {t}.", "{T}\n\n"),
    "story": (STORY, "Write a short story about {t}.", "A story about {t}\n\n"),
    "howto": (HOWTO, "Explain how to {t}, step by step.", "How to {t}\n\n"),
}


def prompt_plan(kinds, seed: int):
    """(kind, topic) pairs, kinds interleaved and topics shuffled once per pass; endless (later passes resample)."""
    rng = random.Random(seed)
    while True:
        pools = {k: rng.sample(KINDS[k][0], len(KINDS[k][0])) for k in kinds}
        for i in range(max(len(p) for p in pools.values())):
            for k in kinds:
                yield k, pools[k][i % len(pools[k])]


def render(tok, kind: str, topic: str) -> tuple[str, str]:
    """(prompt given to the model, text kept before the generated part)."""
    _, ask, heading = KINDS[kind]
    if tok.chat_template:
        msg = [{"role": "user", "content": ask.format(t=topic)}]
        return tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True), ""
    head = heading.format(t=topic, T=topic[:1].upper() + topic[1:])
    return head, head


def synth(cfg: SynthConfig) -> dict:
    cfg.check()
    src = sources.resolve(cfg.source)
    model, tok = sources.load_model(src, torch.float32).eval(), sources.load_tokenizer(src)
    if model.config.model_type == "block_transformer":
        raise BlockformerError(f"{cfg.source} is a Block Transformer; the original model writes the teacher's text")
    if cfg.max_new_tokens >= resolve_max_length(model.config, tok):  # before the progress bar; prompts: below
        raise BlockformerError(f"max_new_tokens (--max-new-tokens) {cfg.max_new_tokens} leaves no room for a prompt "
                               f"in the model's context of {resolve_max_length(model.config, tok)} tokens")
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    docs, written, t0, plan = [], 0, time.perf_counter(), prompt_plan(cfg.kinds, cfg.seed)
    bar = tqdm(total=cfg.tokens, unit="tok", desc="teacher writing")
    while written < cfg.tokens:
        batch = [next(plan) for _ in range(cfg.batch_size)]
        for (kind, topic), (text, n) in zip(batch, write_batch(model, tok, batch, cfg, pad, len(docs))):
            if n:
                docs.append({"text": text, "kind": kind, "topic": topic})
                written += n
                bar.update(n)
    bar.close()
    cfg.out = Path(cfg.out)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out, "".join(json.dumps(d) + "\n" for d in docs))
    seconds = time.perf_counter() - t0
    return {"documents": len(docs), "tokens": written, "seconds": seconds, "tokens_per_s": written / seconds}


@torch.inference_mode()
def write_batch(model, tok, batch, cfg: SynthConfig, pad: int, offset: int) -> list[tuple[str, int]]:
    """Sampled documents for one batch of prompts: (text, generated tokens kept) each; seeded by its position."""
    prompts, heads = zip(*(render(tok, k, t) for k, t in batch))
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template)
    context = resolve_max_length(model.config, tok)
    if enc["input_ids"].shape[1] + cfg.max_new_tokens > context:
        raise BlockformerError(f"a prompt ({enc['input_ids'].shape[1]} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                               f"exceeds the model's context of {context} tokens")
    torch.manual_seed(cfg.seed * 1_000_003 + offset)
    out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                         top_p=cfg.top_p, pad_token_id=pad, eos_token_id=tok.eos_token_id)
    res = []
    for head, row in zip(heads, out[:, enc["input_ids"].shape[1]:]):
        body = tok.decode(row, skip_special_tokens=True).strip()
        res.append((head + body, len(tok.encode(body, add_special_tokens=False)) if body else 0))
    return res
