"""A small word-level text encoder for text-to-video models trained from scratch (no downloads).

    tokenizer = Tokenizer(["a", "red", "circle", "moving", "right"])
    ids, mask = tokenizer(["a red circle moving right"])        # (B, L) int64, (B, L) bool
    text = TextEncoder(len(tokenizer), text_dim=128)(ids, mask)  # (B, L, 128)
"""

import re
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from dit_fast._checks import check_int

PAD, UNK = "<pad>", "<unk>"


#################################################################################
#                                   Tokenizer                                   #
#################################################################################

class Tokenizer:
    """Lower-case word-level tokenizer over a fixed vocabulary; id 0 is padding."""

    def __init__(self, vocabulary: Sequence[str], max_length: int = 16):
        if isinstance(vocabulary, str) or not all(isinstance(w, str) and w for w in vocabulary):
            raise TypeError(f"vocabulary must be a sequence of non-empty words (str), got {vocabulary!r:.200}")
        self.max_length = check_int("max_length", max_length)
        words = [w.lower() for w in vocabulary]
        if len(set(words)) != len(words):
            raise ValueError(f"vocabulary has repeated words: {sorted(w for w in set(words) if words.count(w) > 1)}")
        if PAD in words:
            raise ValueError(f"vocabulary may not contain the reserved token {PAD!r}")
        self.vocabulary = words
        self.index = {w: i + 1 for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.vocabulary) + 1  # + padding

    @staticmethod
    def split(text: str) -> List[str]:
        return re.findall(r"[a-z0-9']+", text.lower())

    def encode(self, text: str) -> List[int]:
        """Word ids of one prompt; an unknown word raises ValueError listing the vocabulary."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        words = self.split(text)
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"unknown word(s) {unknown} in prompt {text!r}; the vocabulary is: "
                             f"{' '.join(self.vocabulary)}")
        if not words:
            raise ValueError(f"prompt {text!r} has no words")
        if len(words) > self.max_length:
            raise ValueError(f"prompt {text!r} has {len(words)} words; at most max_length={self.max_length}")
        return [self.index[w] for w in words]

    def __call__(self, texts, device=None) -> Tuple[Tensor, Tensor]:
        """Prompts (a str or a list of str) -> ids (B, L) int64 padded with 0, and mask (B, L) bool."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t) for t in texts]
        L = max(len(e) for e in encoded)
        ids = torch.zeros(len(encoded), L, dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
        return ids.to(device), (ids != 0).to(device)

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocabulary[i - 1] for i in ids if i != 0)


#################################################################################
#                                  Text Encoder                                 #
#################################################################################

class TextEncoder(nn.Module):
    """Token embedding + learned positions + a few pre-norm transformer layers -> (B, L, text_dim)."""

    def __init__(self, vocab_size: int, text_dim: int = 128, num_layers: int = 2, num_heads: int = 4,
                 max_length: int = 16):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("text_dim", text_dim), ("num_heads", num_heads),
                            ("max_length", max_length)):
            check_int(name, value)
        check_int("num_layers", num_layers, low=0)
        if text_dim % num_heads:
            raise ValueError(f"text_dim {text_dim} must be divisible by num_heads {num_heads}")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, text_dim, padding_idx=0)
        self.pos_embedding = nn.Parameter(torch.zeros(max_length, text_dim))
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(text_dim, num_heads, dim_feedforward=4 * text_dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(num_layers)
        ])
        self.norm = nn.LayerNorm(text_dim)
        self.initialize_weights()

    def initialize_weights(self):
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        with torch.no_grad():
            self.token_embedding.weight[0].zero_()
        nn.init.normal_(self.pos_embedding, std=0.02)

    def forward(self, ids: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """ids: (B, L) int64, mask: (B, L) bool, True on real tokens -> (B, L, text_dim)."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids must be (B, L) int64, got "
                             f"{(tuple(ids.shape), ids.dtype) if isinstance(ids, Tensor) else type(ids).__name__}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"ids has L = {ids.shape[1]} tokens; this encoder holds max_length={self.max_length}")
        if not torch.compiler.is_compiling() and ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be token ids in [0, vocab_size={self.vocab_size}), got values in "
                             f"[{ids.min().item()}, {ids.max().item()}]")
        if mask is None:
            mask = ids != 0
        elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
            raise ValueError(f"mask must be a bool (B, L) = {tuple(ids.shape)} tensor, got "
                             f"{(tuple(mask.shape), mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__}")
        x = self.token_embedding(ids) + self.pos_embedding[: ids.shape[1]]  # (B, L, text_dim)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)  # (B, L, text_dim)
        return self.norm(x) * mask[..., None]  # (B, L, text_dim), padding zeroed
