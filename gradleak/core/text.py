"""Text data and the small text victim: corpus loading, word vocabulary, the transformer LM.

Pure torch plus reading one UTF-8 file. The victim is a causal next-token language
model, our small analogue of the masked LM that DLG (Zhu et al. 2019) attacked: its
training loss takes every token of the sentence both as an input and as a target,
so the gradient carries each token twice (embedding rows and output-layer rows).

Sentence framing: a sentence of T word ids w_1..w_T is fed as [<bos>, w_1..w_T]
(T + 1 positions) and each position predicts the next token of [w_1..w_T, <eos>].
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.core.registry import Registry

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)  # always ids 0..3, in this order, in every vocabulary
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
# Words (letters/digits/underscore, with inner apostrophes or hyphens: "don't", "well-known")
# or any single other non-space character, so punctuation marks are tokens of their own.
_TOKEN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


class CorpusError(ValueError):
    """Raised when a corpus file is missing, unreadable, not UTF-8 text, or has no sentence."""


def tokenize(sentence: str) -> list[str]:
    """Lower-case `sentence` and split it into word and punctuation tokens."""
    return _TOKEN.findall(sentence.lower())


@dataclass(frozen=True)
class Corpus:
    """Tokenised sentences and the word vocabulary built from them.

    Vocabulary order is deterministic: the SPECIALS, then words by descending count,
    ties broken alphabetically.
    """

    sentences: tuple[tuple[str, ...], ...]  # tokenised, lower-cased, truncated to max_len
    vocab: tuple[str, ...]  # id -> token
    max_len: int  # longest sentence in tokens (after truncation)
    stoi: Mapping[str, int] = field(init=False, repr=False, compare=False)  # token -> id

    def __post_init__(self) -> None:
        object.__setattr__(self, "stoi", MappingProxyType({t: i for i, t in enumerate(self.vocab)}))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, sentence: str | Sequence[str]) -> torch.Tensor:
        """Token ids (T,) int64 of a raw sentence (or its tokens); unknown words map to <unk>."""
        tokens = tokenize(sentence) if isinstance(sentence, str) else list(sentence)
        return torch.tensor([self.stoi.get(t, UNK_ID) for t in tokens], dtype=torch.int64)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Space-joined tokens of a (T,) id sequence, <pad> dropped.

        Raises:
            ValueError: on an id outside the vocabulary.
        """
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in values if not 0 <= int(i) < len(self.vocab)]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary of {len(self.vocab)}")
        return " ".join(self.vocab[int(i)] for i in values if int(i) != PAD_ID)

    def encoded(self) -> list[torch.Tensor]:
        """Every sentence as a (T_i,) id tensor, in file order."""
        return [self.encode(s) for s in self.sentences]


def load_corpus(path: str | Path, *, max_len: int | None = None, min_count: int = 1) -> Corpus:
    """Read a UTF-8 text file, one sentence per line (blank lines skipped).

    Args:
        path: the corpus file.
        max_len: truncate sentences to this many tokens; None keeps them whole.
        min_count: words seen fewer times are left out of the vocabulary (they
            encode as <unk>).

    Raises:
        CorpusError: missing or unreadable file, binary or non-UTF-8 content, or no
            sentence with a token in it.
        ValueError: on max_len or min_count below 1.
    """
    if (max_len is not None and max_len < 1) or min_count < 1:
        raise ValueError(f"max_len and min_count must be >= 1, got {max_len}, {min_count}")
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"corpus file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus {p}: {exc.strerror}") from None
    if b"\x00" in raw:
        raise CorpusError(f"{p} looks binary (it has NUL bytes), expected UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{p} is not UTF-8 text (bad byte at offset {exc.start})") from None
    sentences = [tuple(toks[:max_len]) for toks in map(tokenize, text.splitlines()) if toks]
    if not sentences:
        raise CorpusError(f"{p} has no sentence (every line is blank)")
    counts = Counter(t for s in sentences for t in s if t not in SPECIALS)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return Corpus(
        sentences=tuple(sentences),
        vocab=SPECIALS + tuple(words),
        max_len=max(len(s) for s in sentences),
    )


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class TextModelConfig:
    """Shape of the text transformer."""

    vocab_size: int
    max_len: int  # longest sentence in tokens; the model has max_len + 1 positions (<bos>)
    d_model: int = 32  # small enough for CPU attacks, wide enough that T + 1 < d_model
    n_heads: int = 2
    n_layers: int = 1
    d_ff: int = 64  # hidden width of each block's MLP


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP.

    Written out rather than nn.TransformerEncoderLayer so that every op is plainly
    twice differentiable (the attack differentiates the gradient) and there is no
    dropout or fused fast path to think about.
    """

    def __init__(self, cfg: TextModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model)
        )

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.n_heads
        q, k, v = self.qkv(x).split(d, dim=-1)  # each (b, t, d)
        q, k, v = (z.view(b, t, self.n_heads, hd).transpose(1, 2) for z in (q, k, v))  # (b, h, t, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (b, h, t, t)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, t, d)  # (b, t, d)
        return self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TextTransformer(nn.Module):
    """A tiny causal transformer LM: token + learned positional embeddings, untied head.

    The output head is untied from the token embedding on purpose: then the
    embedding gradient's non-zero rows are exactly the tokens that were input.
    """

    def __init__(self, cfg: TextModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_len + 1, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(
        self, ids: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits (B, T + 1, V) of a sentence batch, <bos> prepended here.

        Args:
            ids: (B, T) int64 word ids, or
            embeds: (B, T, d_model) token embeddings (soft inputs, e.g. a soft
                one-hot times `token_embedding.weight`); exactly one of the two.
        """
        if (ids is None) == (embeds is None):
            raise ValueError("pass exactly one of ids or embeds")
        tok = self.token_embedding(ids) if embeds is None else embeds  # (b, t, d)
        b, t, _ = tok.shape
        if t > self.config.max_len:
            raise ValueError(f"sentence of {t} tokens exceeds max_len {self.config.max_len}")
        bos = self.token_embedding.weight[BOS_ID].expand(b, 1, -1)  # (b, 1, d)
        x = torch.cat([bos, tok], dim=1) + self.position_embedding.weight[: t + 1]  # (b, t+1, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (b, t+1, V)


def init_text_model(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Seeded re-initialisation, drawn on the CPU module by module (device-independent).

    Embeddings N(0, 1) and Linear weights N(0, 1/fan_in), so activations start at
    unit scale and the gradient is informative; biases 0; LayerNorm (1, 0).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                _fill(module.weight, torch.randn(module.weight.shape, generator=generator))
            elif isinstance(module, nn.Linear):
                w = torch.randn(module.weight.shape, generator=generator)
                _fill(module.weight, w / math.sqrt(module.in_features))
                if module.bias is not None:
                    _fill(module.bias, torch.zeros(module.bias.shape))
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                _fill(module.weight, torch.ones(module.weight.shape))
                _fill(module.bias, torch.zeros(module.bias.shape))
    return model


def _fill(param: torch.Tensor, values: torch.Tensor) -> None:
    param.copy_(values.to(device=param.device, dtype=param.dtype))


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the framed sentence, <eos> appended to the targets.

    Args:
        logits: (B, T + 1, V) from TextTransformer.
        targets: (B, T) int64 word ids, or (B, T, V) target distributions (soft
            tokens, as the attack's dummies are).
    """
    b, _, v = logits.shape
    log_probs = F.log_softmax(logits, dim=-1)  # (b, t+1, V)
    if targets.dtype == torch.int64:
        eos = torch.full((b, 1), EOS_ID, dtype=torch.int64, device=targets.device)
        return F.nll_loss(log_probs.reshape(-1, v), torch.cat([targets, eos], dim=1).reshape(-1))
    eos_row = torch.zeros((b, 1, v), dtype=targets.dtype, device=targets.device)
    eos_row[..., EOS_ID] = 1.0
    probs = torch.cat([targets, eos_row], dim=1)  # (b, t+1, V)
    return -(probs * log_probs).sum(dim=-1).mean()


def text_gradients(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What an honest peer sends for a sentence batch: d(LM loss)/d(params), parameters() order.

    Args:
        model: the peer's TextTransformer; its .grad fields are not touched.
        ids: (T,) or (B, T) int64 word ids (equal lengths within a batch).
    """
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    loss = language_model_loss(model(ids), ids)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return tuple(g.detach().to(torch.float32) for g in grads)


# --------------------------------------------------------------------------- registry

TextModelFactory = Callable[[TextModelConfig], nn.Module]
_REGISTRY: Registry[TextModelFactory] = Registry("text model")
TEXT_MODELS: Mapping[str, TextModelFactory] = _REGISTRY.view
register_text_model = _REGISTRY.register  # decorator; ValueError if the name is taken


register_text_model("transformer")(TextTransformer)


def create_text_model(
    name: str, *, vocab_size: int, max_len: int, seed: int = 0, **shape: int
) -> nn.Module:
    """Build a registered text model with a seeded initialisation.

    Args:
        name: registry name (see TEXT_MODELS).
        vocab_size: tokens in the vocabulary, SPECIALS included.
        max_len: longest sentence in tokens.
        seed: the initialisation seed; the same seed gives the same weights on any device.
        shape: overrides of TextModelConfig (d_model, n_heads, n_layers, d_ff).

    Raises:
        ValueError: on an unknown name (the message lists the known ones) or bad sizes.
    """
    factory = _REGISTRY.get(name)
    if vocab_size <= len(SPECIALS) or max_len < 1:
        raise ValueError(f"need vocab_size > {len(SPECIALS)} and max_len >= 1, got {vocab_size}, {max_len}")
    cfg = TextModelConfig(vocab_size=vocab_size, max_len=max_len, **shape)
    return init_text_model(factory(cfg), torch.Generator().manual_seed(seed))
