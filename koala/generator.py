"""The user API: SpeculativeGenerator.from_pretrained(...).generate(...)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from .errors import ContextLengthError, KoalaError
from .loading import DEFAULT_TARGET, LoadedTarget, load_target
from .model import causal_mask, not_exact
from .decoding import PlainDecoder
from .sampling import SamplerState, SamplingParams, draw_noise, sample, warp_probs


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0           # prefill + decode, after the prompt is tokenised
    prefill_s: float = 0.0
    tokens_per_s: float = 0.0     # new_tokens / wall_s
    target_forwards: int = 0      # target forward passes after the prefill
    # speculative decoding (None when decoding plainly)
    tau: float | None = None      # mean tokens per target forward, bonus included
    alpha: list[float] | None = None  # n-alpha, n = 1, 2, 3 (chain mode)
    draft_s: float | None = None
    verify_s: float | None = None
    accepted_per_step: list[int] = field(default_factory=list, repr=False)

    def to_dict(self):
        d = asdict(self)
        d.pop("accepted_per_step")
        return d


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


class OutputTracker:
    """Collects generated ids; handles EOS, stop strings, max_new_tokens and streaming."""

    def __init__(self, tokenizer, eos_ids, stop, stream, max_new_tokens):
        self.tok, self.eos, self.stream = tokenizer, set(eos_ids), stream
        self.stop = [s for s in (stop or []) if s]
        self.max_new = max_new_tokens
        self.ids: list[int] = []
        self.emitted = 0
        self.done = False
        self.text = ""

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, new_ids) -> bool:
        for t in new_ids:
            self.ids.append(int(t))
            if int(t) in self.eos or len(self.ids) >= self.max_new:
                self.done = True
                break
        # the text is only needed here for stop strings and streaming: decoding the whole answer
        # after every iteration would put O(n^2) tokenizer work on the decoding hot path
        if not (self.stop or self.stream is not None):
            if self.done:
                self.text = self._decode(self.ids)
            return self.done
        self.text = self._decode(self.ids)
        if self.stop:
            hits = [self.text.find(s) + len(s) for s in self.stop if s in self.text]
            if hits:
                cut = min(hits)
                # keep the fewest tokens whose text contains the stop string
                while len(self.ids) > 1 and len(self._decode(self.ids[:-1])) >= cut:
                    self.ids.pop()
                self.text = self.text[:cut]
                self.done = True
        if self.stream is not None:
            hold = 0 if self.done else max([len(s) - 1 for s in self.stop] + [0])
            end = len(self.text) - hold
            while end > self.emitted and self.text[end - 1] == "\ufffd" and not self.done:
                end -= 1  # an incomplete multi-byte character: wait for its next token
            if end > self.emitted:
                self.stream(self.text[self.emitted:end])
                self.emitted = end
        return self.done


class SpeculativeGenerator:
    """Lossless speculative decoding with a KOALA draft head; plain decoding when draft=None."""

    def __init__(self, target: LoadedTarget, head=None, max_seq_len: int = 2048,
                 use_cuda_graph: bool | None = None, **draft_options):
        self.target = target
        self.model = target.model
        self.tokenizer = target.tokenizer
        cfg = self.model.config
        limit = cfg.max_position_embeddings
        if cfg.sliding_window:
            limit = min(limit, cfg.sliding_window)
        if max_seq_len > limit:
            raise ContextLengthError(
                f"max_seq_len={max_seq_len} exceeds what the model supports ({limit} positions"
                f"{', its sliding window' if cfg.sliding_window else ''}); pass max_seq_len <= {limit}")
        self.max_seq_len = max_seq_len
        self.model.setup_cache(1, max_seq_len)
        self.device = self.model.device
        if self.device.type == "cuda":
            from .model import Transformer
            fused = os.environ.get("KOALA_KERNELS", "1") != "0"
            Transformer.use_kernels(fused, exact=os.environ.get("KOALA_EXACT", "1") != "0")
            logging.getLogger("koala").info("koala: %s", "fused Triton kernels on" if fused else
                                            "KOALA_KERNELS=0: PyTorch reference path (no Triton kernels)")
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        self.plain = PlainDecoder(self.model, use_graph=self.use_cuda_graph)
        self.sampler = SamplerState(self.device)
        self.head = head
        self.spec = None
        self._batch_decoder = None    # generate_batch's last decoder (its caches and graphs), reused
        if head is not None:
            from .speculative import SpeculativeDecoder
            self.spec = SpeculativeDecoder(self.model, head, use_graph=self.use_cuda_graph, **draft_options)
        # the prompt's prefill in CUDA graphs (one per bucket of prompt lengths); KOALA_PREFILL_GRAPHS=0
        # keeps it eager (an A/B switch for bench/overhead.py)
        self.prefill_graphs = None
        if (self.use_cuda_graph and self.device.type == "cuda"
                and os.environ.get("KOALA_PREFILL_GRAPHS", "1") != "0"):
            from .prefill import PrefillGraphs
            eagle_head = self.spec.head if self.spec is not None and self.spec.eagle else None
            self.prefill_graphs = PrefillGraphs(self.model, self.plain.window, eagle_head)

    @classmethod
    def from_pretrained(cls, target: str | os.PathLike = DEFAULT_TARGET, draft=None, device=None, dtype=None,
                        max_seq_len: int = 2048, use_cuda_graph: bool | None = None, **draft_options):
        """target: 'smollm2-135m-instruct' (the embedded default), a Hugging Face checkpoint
        directory or a .gguf file. draft: None (plain decoding), a DraftConfig (an untrained
        head), a head directory, or 'default' (the head shipped for the embedded model).
        draft_options: drafting settings (mode='chain'|'tree', depth=..., tree_size=...)."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        loaded = load_target(target, device=device, dtype=dtype)
        head = None
        if draft is not None:
            from .speculative import resolve_draft
            head = resolve_draft(draft, loaded)
        return cls(loaded, head, max_seq_len=max_seq_len, use_cuda_graph=use_cuda_graph, **draft_options)

    # ---------------------------------------------------------------- prompts
    def encode(self, prompt, chat: bool | None = None) -> list[int]:
        tok = self.tokenizer
        has_template = getattr(tok, "chat_template", None) is not None
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            V = self.model.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < V]
            if bad:
                raise KoalaError(f"token ids must be in [0, {V}) for this model; got {bad[:5]}")
            return list(prompt)                              # token ids, used as given
        if isinstance(prompt, str):
            if chat is None:
                chat = has_template
            if not chat:
                return tok(prompt, add_special_tokens=True)["input_ids"]
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            raise KoalaError("a prompt is a string, a non-empty list of {'role': str, 'content': str} messages, "
                             "or a non-empty list of token ids")
        if not has_template:
            raise KoalaError("this tokenizer has no chat template: pass the prompt as a plain string")
        text = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    # ---------------------------------------------------------------- generation
    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stream=None, stop=None,
                 chat: bool | None = None, ignore_eos: bool = False) -> GenerationResult:
        """Generate an answer to a string (wrapped as one user message when the tokenizer has a
        chat template, unless chat=False), a list of chat messages, or a list of token ids (used
        as given). temperature=0 is greedy;
        seed makes sampling repeatable; stream(text_delta) is called as text is produced; stop is
        a string or list of strings that end the answer; ignore_eos decodes max_new_tokens exactly
        (benchmarks)."""
        params = SamplingParams(temperature, top_p, top_k)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise KoalaError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if stop is not None and isinstance(stop, str):
            stop = [stop]
        ids = self.encode(prompt, chat)
        n = len(ids)
        margin = self.spec.max_new_per_step if self.spec else self.plain.chunk
        need = n + max_new_tokens + margin
        if need > self.max_seq_len:
            raise ContextLengthError(
                f"the prompt has {n} tokens; with max_new_tokens={max_new_tokens} (+{margin} slots of "
                f"working space) it needs {need} cache slots but the cache holds {self.max_seq_len}: "
                f"shorten the prompt, lower max_new_tokens, or pass a larger max_seq_len to from_pretrained "
                f"(the model allows up to {self.model.config.max_position_embeddings})")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        self.sampler.set(params)
        self.plain.sampler.set(params)
        eos = [] if ignore_eos else self.model.config.eos_token_ids
        out = OutputTracker(self.tokenizer, eos, stop, stream, max_new_tokens)
        stats = GenerationStats(prompt_tokens=n)

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            first, hidden, primed = self._prefill(ids, params, gen)
            stats.prefill_s = time.perf_counter() - t0
            if not out.add([first]):
                if self.spec is None:
                    self._decode_plain(first, n, params, gen, out, stats)
                else:
                    self.spec.decode(ids, first, hidden, params, gen, out, stats, primed=primed)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.wall_s = time.perf_counter() - t0
        stats.new_tokens = len(out.ids)
        stats.tokens_per_s = stats.new_tokens / stats.wall_s if stats.wall_s > 0 else 0.0
        return GenerationResult(text=out.text, token_ids=out.ids, stats=stats)

    def generate_batch(self, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                       top_k: int = 0, seed: int | None = None, stop=None, chat: bool | None = None,
                       ignore_eos: bool = False, depth: int | None = None) -> list[GenerationResult]:
        """Decode several prompts at once (batch size > 1), with this generator's head drafting a
        chain of `depth` tokens (default: its depth), or plainly without a head; greedy, or
        sampled (temperature, top_p, top_k, seed as in generate) by speculative sampling, row by
        row. Each row accepts its own prefix, so rows advance at their own pace; prompts may
        differ in length. Returns one GenerationResult per prompt (wall_s and tokens_per_s are
        the batch's; tau and alpha the row's own). Chains only; on CUDA each iteration is a CUDA
        graph. The last call's decoder (its caches, sized for that call, and its graphs) is kept
        for the next call of the same batch size; see koala/batch.py for how rows share the cache."""
        from .batch import generate_batch
        return generate_batch(self, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop, chat,
                              ignore_eos, depth)

    def warmup_batch(self, batch_size: int, prompt_tokens: int, max_new_tokens: int = 256, temperatures=(0.0,),
                     top_p: float = 1.0, top_k: int = 0, depth: int | None = None) -> int:
        """generate_batch's warmup: allocate the caches of a batch of batch_size prompts of up to
        prompt_tokens tokens with max_new_tokens new tokens, and capture the CUDA graph of every
        attention window such a batch reaches, for the sampling modes `temperatures` asks (pass
        the top_p / top_k the requests will use), so that later calls of batch_size prompts
        that fit (no longer prompts, no more new tokens) capture nothing; without it a call pays
        a capture per window it reaches first. Returns the number of graphs captured."""
        from .batch import warmup_batch
        return warmup_batch(self, batch_size, prompt_tokens, max_new_tokens, temperatures, top_p, top_k, depth)

    def warmup(self, temperatures=(0.0,), new_tokens: int = 8, top_p: float = 1.0, top_k: int = 0) -> list[int]:
        """Compile the kernels and capture the CUDA graphs of every attention window this
        generator can reach (each window up to max_seq_len: prefill, plain decoding and, with a
        head, the draft and verify graphs), for greedy decoding and/or sampling as `temperatures`
        asks, so that later calls pay none of it: first-request latency in a server, steady-state
        timings in a benchmark. Each window is reached by a short generation from a synthetic
        prompt that ends just past the previous window. Sampling with top-k or top-p traces other
        graphs than temperature alone: pass the top_p / top_k the requests will use. Returns the
        prompt lengths used."""
        if self.prefill_graphs is not None:     # every prompt-length bucket's prefill graph
            self.prefill_graphs.capture_all(self.max_seq_len)
        base = self.encode("The quick brown fox jumps over the lazy dog. ", chat=False) or [0]
        margin = self.spec.max_new_per_step if self.spec else self.plain.chunk
        lengths, n = [], 1                      # the first window from a 1-token prompt
        for w in self.plain.windows:
            if n + new_tokens + margin > self.max_seq_len:
                break
            lengths.append(n)
            n = w                               # then each from a prompt that fills the last one
        for T in temperatures:
            for n in lengths:
                ids = (base * (n // len(base) + 1))[:n]
                self.generate(ids, max_new_tokens=new_tokens, temperature=T, seed=0, ignore_eos=True,
                              **({} if T == 0 else dict(top_p=top_p, top_k=top_k)))
        return lengths

    def _prefill(self, ids, params, gen):
        """The prompt's forward: returns the first new token, the prompt's hidden states (1, T, D),
        T >= len(ids), and whether an EAGLE head's cache was filled as well (the graphed path
        does both in one replay; koala/prefill.py)."""
        dev = self.device
        got = self.prefill_graphs.run(ids) if self.prefill_graphs is not None else None
        if got is not None:
            lg, hidden = got
            primed = self.prefill_graphs.head is not None
        else:
            tokens = torch.tensor([ids], device=dev)
            slots = torch.arange(len(ids), device=dev)
            last = torch.tensor([len(ids) - 1], device=dev)
            with not_exact():   # plain and speculative decoding share the prefill: no bits to match
                logits, hidden = self.model(tokens, slots.unsqueeze(0), slots,
                                            causal_mask(slots, self.plain.window(len(ids) - 1)),
                                            logits_index=last)
            lg, primed = logits[:, -1], False
        if params.greedy:
            tok = lg.argmax(-1)
        else:
            tok = sample(warp_probs(lg, self.sampler), draw_noise(lg.shape, gen, dev))
        return int(tok.item()), hidden, primed

    def _decode_plain(self, first, n, params, gen, out, stats):
        pos = n
        self.plain.start(first, pos)
        while not out.done:
            k = min(self.plain.chunk, out.max_new - len(out.ids))
            toks = self.plain.run(k, params.greedy, pos, gen).tolist()  # one sync per chunk
            pos += k
            out.add(toks)
        stats.target_forwards = len(out.ids) - 1  # the first token came from the prefill
