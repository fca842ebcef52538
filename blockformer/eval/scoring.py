"""One scoring path for vanilla Hugging Face models and Block Transformers, with lm-eval 0.4's tokenisation.

Log-likelihood of a continuation: `(context + continuation)[-(max_length + 1):][:-1]` is fed once; the logits at the
continuation's positions are scored.  A Block Transformer has two conventions (`anchor`):
  context (default) -- the last context token closes a block, as the last prompt token does in generation, so the
                       continuation starts a new block: the score is exactly what the model assigns when it generates
                       the continuation token by token after that context;
  first             -- the first token of the window closes block 0 (the paper's evaluation: `L_B - 1` left pads),
                       the alignment of training and of one plain forward pass over context + continuation.
Vanilla models have no blocks and ignore it.

Speed: requests are sorted by length and packed into batches under a token budget; only the continuation
positions go through the LM head and log-softmax (the vocabulary projection dominates small models' cost).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import BlockformerError
from ..families import FAMILIES
from ..model import BlockTransformerForCausalLM, output_head

DEFAULT_MAX_LENGTH = 2048
ANCHORS = ("context", "first")


class Scorer:
    def __init__(self, model, tokenizer, batch_tokens: int | None = None, max_batch: int = 64,
                 max_length: int | None = None, anchor: str = "context"):
        if anchor not in ANCHORS:
            raise BlockformerError(f"anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
        self.model, self.tok, self.anchor = model.eval(), tokenizer, anchor
        self.block = isinstance(model, BlockTransformerForCausalLM)
        self.device = next(model.parameters()).device
        # small batches keep activations in cache on a CPU; piqa, 100 items, 2 threads: Intel Xeon 18 s at 1024
        # tokens, 22 s at 2048, 34 s at 16384; AMD EPYC (Zen 4) 13.7-14.1 s at 1024, 13.5-14.4 at 512, 15.8 at
        # 2048, 19.1 at 4096, 14.5-16.4 at 256-384 (medians of 3, two passes). A GPU wants large ones.
        self.batch_tokens = batch_tokens or (16384 if self.device.type == "cuda" else 1024)
        self.max_batch = max_batch
        context = resolve_max_length(model.config, tokenizer)
        if max_length is not None and not 2 <= max_length <= context:
            raise BlockformerError(f"max_length (--max-length) must be between 2 and the model's context of {context} "
                                   f"tokens, got {max_length}")
        self.max_length = max_length or context

    # ----------------------------------------------------------------------------------- tokenisation (lm-eval)
    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def encode(self, text: str, special: bool | None = None) -> list[int]:
        kw = {} if special is None else {"add_special_tokens": special}
        if special is None and text.startswith(self.tok.decode(self.prefix_token_id)):
            kw = {"add_special_tokens": False}  # the text already starts with BOS
        return self.tok.encode(text, **kw)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, special=False)
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        n = len(context) - len(context.rstrip())
        if n:  # trailing spaces belong to the continuation, as lm-eval does
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # ----------------------------------------------------------------------------------------------- scoring
    def loglikelihood(self, pairs: list[tuple[str, str]], progress=None) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], progress)

    @torch.inference_mode()
    def loglikelihood_choices(self, items: list[list[tuple[str, str]]], progress=None):
        """Per item, the scores of its (context, choice) pairs; a shared context runs once, its KV cache reused."""
        enc = [[self.encode_pair(c, x) for c, x in pairs] for pairs in items]
        out: list = [None] * len(items)
        share = [self._shareable(e) for e in enc]
        plain = [i for i, s in enumerate(share) if not s]
        flat = self.loglikelihood_tokens([r for i in plain for r in enc[i]], progress)
        for i in plain:
            out[i], flat = flat[: len(enc[i])], flat[len(enc[i]):]
        longest = lambda i: max(len(x) for _, x in enc[i])  # noqa: E731 - padding follows the longest choice
        # similar context lengths batch together (contexts are left-padded to the longest), then similar choices
        shared = sorted((i for i, s in enumerate(share) if s),
                        key=lambda i: (len(enc[i]), len(enc[i][0][0]), longest(i)))
        for batch in self._shared_batches(shared, enc):
            for i, r in zip(batch, self._score_shared([enc[i] for i in batch])):
                out[i] = r
            if progress is not None:
                progress.update(sum(len(enc[i]) for i in batch))
        return out

    def _shareable(self, e) -> bool:
        same_ctx = all(c == e[0][0] for c, _ in e)
        fits = all(len(c) + len(x) - 1 <= self.max_length for c, x in e)
        if self.block:  # the context's blocks run once (the paper's --anchor first splits them: plain path)
            return self.anchor == "context" and len(e) > 1 and same_ctx and fits and self._block_cheaper(e)
        # padded cost of the cached path vs the plain one; the cached path pays when the context dominates
        shared_cost = len(e[0][0]) + len(e) * max(len(x) for _, x in e)
        plain_cost = sum(len(c) + len(x) for c, x in e)
        cheaper = shared_cost < 0.8 * plain_cost
        return self.model.config.model_type in FAMILIES and same_ctx and fits and cheaper

    def _block_cheaper(self, e) -> bool:
        """Layer-positions of the shared path vs the plain one: the context's blocks once instead of once per choice
        (the token decoder's work is the same on both paths; a choice's padding blocks are left out of the block
        decoder's pass); the margin pays for padding between items and the tree mask."""
        c = self.model.config
        L, w, nt = c.block_length, c.prefix_length + c.block_length - 1, c.num_token_layers
        nb = c.num_block_layers + c.embedder_layers * L  # the embedder's layers run on every token
        blocks = lambda t: -(-t // L)  # noqa: E731
        Nc = blocks(len(e[0][0]))
        shared = nb * (Nc + sum(blocks(len(x)) - 1 for _, x in e)) + sum(nt * blocks(len(x)) * w for _, x in e)
        plain = sum(nb * (Nc + blocks(len(x))) + nt * blocks(len(x)) * w for _, x in e)
        return shared < 0.8 * plain

    def _shared_batches(self, order, enc):
        batch, tc, tx = [], 0, 0
        for i in order:
            n = len(enc[i])
            tc2, tx2 = max(tc, len(enc[i][0][0])), max(tx, max(len(x) for _, x in enc[i]))
            if batch and ((len(batch) + 1) * (tc2 + n * tx2) > self.batch_tokens or n != len(enc[batch[0]])):
                yield batch
                batch, tc2, tx2 = [], len(enc[i][0][0]), max(len(x) for _, x in enc[i])
            batch.append(i)
            tc, tx = tc2, tx2
        if batch:
            yield batch

    def _score_shared(self, items):
        return self._score_shared_block(items) if self.block else self._score_shared_cached(items)

    def _score_shared_block(self, items):
        """Contexts left-padded to whole blocks (B, Nc*L_B), their last token closing one; choices right-padded to
        whole blocks (B, n, K*L_B); the model runs the context's blocks once (`choices_hidden`)."""
        L, n, pad = self.model.config.block_length, len(items[0]), self.prefix_token_id
        Tc = -(-max(len(it[0][0]) for it in items) // L) * L
        Tx = -(-max(len(x) for it in items for _, x in it) // L) * L
        ids, cmask = torch.full((len(items), Tc), pad), torch.zeros(len(items), Tc, dtype=torch.bool)
        xids, xmask = torch.full((len(items), n, Tx), pad), torch.zeros(len(items), n, Tx, dtype=torch.bool)
        for b, it in enumerate(items):
            c = it[0][0]
            ids[b, Tc - len(c):], cmask[b, Tc - len(c):] = torch.tensor(c), True
            for j, (_, x) in enumerate(it):
                xids[b, j, : len(x)], xmask[b, j, : len(x)] = torch.tensor(x), True
        dev = self.device
        h = self.model.choices_hidden(ids.to(dev), cmask.to(dev), xids.to(dev), xmask.to(dev)).flatten(0, 1)
        scores = self._gather_scores(h, [(len(x), x) for it in items for _, x in it])
        return [scores[b * n:(b + 1) * n] for b in range(len(items))]

    def _score_shared_cached(self, items):
        """Contexts left-padded once (B, Tc); their cache repeated per choice; choices right-padded (B*n, Tx)."""
        n, dev = len(items[0]), self.device
        ctxs = [it[0][0] for it in items]
        Tc = max(map(len, ctxs))
        ids = torch.full((len(items), Tc), self.prefix_token_id, dtype=torch.long)
        cmask = torch.zeros(len(items), Tc, dtype=torch.long)
        for b, c in enumerate(ctxs):
            ids[b, Tc - len(c):], cmask[b, Tc - len(c):] = torch.tensor(c), 1
        pos = (cmask.cumsum(1) - 1).clamp(min=0)
        out = self.model.base_model(input_ids=ids.to(dev), attention_mask=cmask.to(dev), position_ids=pos.to(dev),
                                    use_cache=True)
        first = out.last_hidden_state[:, -1].repeat_interleave(n, 0)                 # predicts each cont[0]
        conts = [x for it in items for _, x in it]
        Tx = max(map(len, conts)) - 1
        hidden = [first[:, None]]
        if Tx > 0:
            out.past_key_values.batch_repeat_interleave(n)
            xids = torch.full((len(conts), Tx), self.prefix_token_id, dtype=torch.long)
            xmask = torch.zeros(len(conts), Tx, dtype=torch.long)
            for b, x in enumerate(conts):
                xids[b, : len(x) - 1], xmask[b, : len(x) - 1] = torch.tensor(x[:-1]), 1
            xpos = pos[:, -1:].repeat_interleave(n, 0) + 1 + torch.arange(Tx)
            mask = torch.cat([cmask.repeat_interleave(n, 0), xmask], 1)
            h = self.model.base_model(input_ids=xids.to(dev), attention_mask=mask.to(dev), position_ids=xpos.to(dev),
                                      cache=out.past_key_values).last_hidden_state
            hidden.append(h)
        h = torch.cat(hidden, 1)                                                        # (B*n, 1 + Tx, D)
        scores = self._gather_scores(h, [(len(x), x) for x in conts])
        return [scores[b * n:(b + 1) * n] for b in range(len(items))]

    @torch.inference_mode()
    def loglikelihood_rolling(self, texts: list[str], progress=None) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of `max_length`, each after one token of context."""
        reqs, owner = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.encode(text, special=False), self.prefix_token_id, self.max_length):
                reqs.append(w)
                owner.append(i)
        out = [0.0] * len(texts)
        if progress is not None:
            progress.total = len(reqs)  # the bar counts windows, known only now
            progress.refresh()
        for i, (ll, _) in zip(owner, self.loglikelihood_tokens(reqs, progress)):
            out[i] += ll
        return out

    @torch.inference_mode()
    def greedy_until(self, context: str, until: list[str], max_new: int) -> str:
        """Greedy continuation of `context` through the model's own `generate` (our block decoding, or Hugging
        Face's for a vanilla model), cut at EOS or the first stop string."""
        max_new = max(1, min(max_new, self.max_length - 1))
        ids = torch.tensor([self.encode(context)[-(self.max_length - max_new):]], device=self.device)
        eos = self.tok.eos_token_id
        def stop(new):  # (B, t) new tokens -> (B,) rows whose text holds a stop string
            return torch.tensor([any(u in self.tok.decode(r) for u in until) for r in new.tolist()], device=new.device)
        if self.block:
            out = self.model.generate(ids, max_new_tokens=max_new, eos_token_id=eos, stop=stop if until else None)
        else:  # HF's own stop_strings needs a byte-level vocabulary; this criterion works with any tokenizer
            from transformers import StoppingCriteriaList
            crit = StoppingCriteriaList([lambda seq, scores, **_: stop(seq[:, ids.shape[1]:])] if until else [])
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=False, eos_token_id=eos, pad_token_id=eos, stopping_criteria=crit)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: new.index(eos)] if eos in new else new
        text = self.tok.decode(new)
        hits = [text.index(u) for u in until if u in text]
        return text[: min(hits)] if hits else text

    @torch.inference_mode()
    def loglikelihood_tokens(self, reqs: list[tuple[list[int], list[int]]], progress=None):
        """[(context ids, continuation ids)] -> [(sum of log-probs, greedy?)] in the input order."""
        longest = max((len(x) for _, x in reqs), default=0)
        if longest > self.max_length:  # lm-eval asserts the same: the window must hold every scored token
            raise BlockformerError(f"a continuation of {longest} tokens does not fit the scoring window of "
                                   f"{self.max_length} tokens; raise --max-length")
        inputs = [((c + x)[-(self.max_length + 1):][:-1], x) for c, x in reqs]
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list = [None] * len(inputs)
        bar = progress or tqdm(total=len(inputs), disable=True)
        for batch in self._batches(order, inputs):
            for i, r in zip(batch, self._score([inputs[i] for i in batch])):
                results[i] = r
            bar.update(len(batch))
        return results

    def _batches(self, order, inputs):
        batch, longest = [], 0
        for i in order:
            longest = max(longest, len(inputs[i][0]))
            if batch and (len(batch) + 1) * longest > self.batch_tokens or len(batch) == self.max_batch:
                yield batch
                batch, longest = [], len(inputs[i][0])
            batch.append(i)
        if batch:
            yield batch

    def _score(self, rows):
        T = max(len(inp) for inp, _ in rows)
        ids = torch.full((len(rows), T), self.prefix_token_id, dtype=torch.long)
        for b, (inp, _) in enumerate(rows):  # right padding: causal attention never looks at it
            ids[b, : len(inp)] = torch.tensor(inp)
        # rows start at index 0 (right padding), so the first real token is index 0; else the last context token
        anchor = torch.tensor([0 if self.anchor == "first" else len(inp) - len(cont) for inp, cont in rows])
        spans = [(len(inp), cont) for inp, cont in rows]
        need = torch.zeros_like(ids, dtype=torch.bool)  # the continuation's positions: only they are scored
        for b, (end, cont) in enumerate(spans):
            need[b, end - len(cont): end] = True
        h = self._hidden(ids.to(self.device), anchor.to(self.device), need.to(self.device))   # (B, T, D)
        return self._gather_scores(h, spans)

    def _gather_scores(self, h, rows):
        """rows: (end, continuation) per batch row; positions end-len(cont) .. end-1 of h predict it."""
        pos = torch.cat([torch.arange(end - len(cont), end) for end, cont in rows]).to(self.device)
        row = torch.cat([torch.full((len(cont),), b) for b, (_, cont) in enumerate(rows)]).to(self.device)
        target = torch.tensor([t for _, cont in rows for t in cont], device=self.device)
        logp = F.log_softmax(self._head(h[row, pos]).float(), -1)              # (n_cont, V): only where scored
        tok_ll = logp.gather(1, target[:, None])[:, 0]
        greedy = logp.argmax(-1) == target
        out, start = [], 0
        for _, cont in rows:
            end = start + len(cont)
            out.append((tok_ll[start:end].sum().item(), bool(greedy[start:end].all())))
            start = end
        return out

    def _hidden(self, ids, anchor, need=None):
        if self.block:
            return self.model.final_hidden(ids, anchor=anchor, need=need)
        if self.model.config.model_type in FAMILIES:  # plain families: final hidden state, then the head
            return self.model.base_model(input_ids=ids).last_hidden_state
        return self.model(input_ids=ids).logits  # unknown heads (soft-capping, scaling): take the logits

    def _head(self, h):
        if self.block or self.model.config.model_type in FAMILIES:
            return output_head(self.model)(h)
        return h


def rolling_windows(tokens: list[int], prefix: int, max_len: int):
    """lm-eval's disjoint rolling windows: (context ids, predicted ids); every token is predicted once."""
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        yield tokens[max(end - max_len - 1, 0): end - n], tokens[end - n: end]
        done = end


def resolve_max_length(config, tokenizer) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return getattr(config, attr)
    n = getattr(tokenizer, "model_max_length", None)
    return n if n and n < 10**9 else DEFAULT_MAX_LENGTH
