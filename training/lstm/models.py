"""The two LSTM models. Both run their LSTM over ``pack_padded_sequence``.

Exported with the legacy (TorchScript) ONNX exporter, ``pack_padded_sequence`` /
``pad_packed_sequence`` around ``nn.LSTM`` become one ONNX ``LSTM`` node whose
``sequence_lens`` input is ``lengths``: padded steps are skipped in both directions and their
outputs are zero, so a sentence gets the same result alone or batched with longer ones.
Everything else (char CNN masking, max-pooling mask) is written with ops that keep the batch
and sequence axes dynamic. ``lengths`` are clamped to >= 1 (ONNX ``Clip``): a row of length 0
(an empty text) reads one padding step instead of producing garbage; the padded batch must
still have at least one step (sequence >= 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def run_packed(
    lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``lstm`` (batch_first) over the valid steps of ``x`` [B, T, D].

    Returns outputs [B, T, H*dirs] (zeros at padded steps, T kept) and h_n
    [layers*dirs, B, H] taken at each sequence's last valid step.
    """
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, (h_n, _) = lstm(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
    return out, h_n


class CharCNN(nn.Module):
    """Character embeddings -> Conv1d -> ReLU -> max over the characters of each word.

    Padding characters (id 0) are masked out of the max, so the features do not depend on
    how far a word is padded; an all-padding word gets zero features.
    """

    def __init__(self, n_chars: int, dim: int = 32, filters: int = 64, kernel: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_chars, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, filters, kernel, padding=kernel // 2)
        self.out_dim = filters

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, T, F]
        batch, seq, width = char_ids.size(0), char_ids.size(1), char_ids.size(2)
        flat = char_ids.reshape(batch * seq, width)
        h = torch.relu(self.conv(self.emb(flat).transpose(1, 2)))  # [N, F, W], >= 0
        h = h.masked_fill((flat == 0).unsqueeze(1), 0.0)
        return h.max(dim=2).values.reshape(batch, seq, self.out_dim)


class PosTagger(nn.Module):
    """Word embedding + char CNN -> BiLSTM (packed) -> linear: logits per token."""

    def __init__(
        self,
        vocab_size: int,
        n_chars: int,
        n_tags: int,
        *,
        word_dim: int = 100,
        char_dim: int = 32,
        char_filters: int = 64,
        hidden: int = 128,
        layers: int = 1,
        dropout: float = 0.33,
    ) -> None:
        super().__init__()
        self.word_emb = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.chars = CharCNN(n_chars, char_dim, char_filters)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            word_dim + char_filters,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.out = nn.Linear(2 * hidden, n_tags)

    def forward(
        self, word_ids: torch.Tensor, char_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        lengths = lengths.clamp(min=1)  # a length-0 row reads one padding step
        x = torch.cat([self.word_emb(word_ids), self.chars(char_ids)], dim=-1)
        out, _ = run_packed(self.lstm, self.drop(x), lengths)
        return self.out(self.drop(out))


class PolarityClassifier(nn.Module):
    """Embedding -> (Bi)LSTM (packed) -> [final h_n of both directions ; max-pool over valid
    outputs] -> linear: logits [B, n_labels]."""

    def __init__(
        self,
        vocab_size: int,
        n_labels: int = 2,
        *,
        emb_dim: int = 128,
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.5,
        max_pool: bool = True,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, emb_dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            emb_dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.dirs = 2 if bidirectional else 1
        self.max_pool = max_pool
        feat = hidden * self.dirs * (2 if max_pool else 1)
        self.out = nn.Linear(feat, n_labels)

    def forward(self, word_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.clamp(min=1)  # an empty text reads one padding step
        x = self.drop(self.emb(word_ids))
        out, h_n = run_packed(self.lstm, x, lengths)
        last = torch.cat([h_n[-d] for d in range(self.dirs, 0, -1)], dim=-1)  # last layer
        feats = [last]
        if self.max_pool:
            steps = torch.arange(out.size(1), device=out.device).unsqueeze(0)
            pad = (steps >= lengths.unsqueeze(1)).unsqueeze(2)  # [B, T, 1]
            feats.append(out.masked_fill(pad, -1e4).max(dim=1).values)
        return self.out(self.drop(torch.cat(feats, dim=-1)))
