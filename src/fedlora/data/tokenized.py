"""Tokenizing a corpus once and serving padded batches quickly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedlora.errors import FedLoraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TokenizedCorpus"]

_CHUNK = 2048  # texts per tokenizer call


class TokenizedCorpus:
    """All texts tokenized ONCE (fast tokenizer, batched, truncation to max_length, no padding).

    Batches are padded on the right to the longest example in the batch. Token ids are kept
    in one flat ``int32`` array with per-example offsets, so memory grows with the real
    token count, and :meth:`batch` gathers a ``[batch, longest]`` block with one vectorised
    index operation.

    Parameters
    ----------
    texts : sequence of str
        The texts, one per example.
    labels : numpy.ndarray
        Integer labels, one per text.
    tokenizer : transformers.PreTrainedTokenizerBase
        The tokenizer (a fast one is much quicker). Special tokens are added as the
        tokenizer does by default.
    max_length : int
        Longest token sequence kept (special tokens included); longer texts are truncated.

    Attributes
    ----------
    lengths : numpy.ndarray
        ``int64`` token count per example (at most ``max_length``).
    labels : numpy.ndarray
        ``int64`` label per example.
    max_length : int
        The truncation length.
    pad_token_id : int
        Id used for padding: the tokenizer's ``pad_token_id``, else its ``eos_token_id``, else 0
        (padded positions have ``attention_mask`` 0, so the value is never attended to).

    Raises
    ------
    FedLoraError
        If ``max_length`` is not a positive integer or ``texts`` and ``labels`` differ in length.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: np.ndarray,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise FedLoraError(f"max_length must be a positive integer (for example 128), got {max_length!r}")
        labels_arr = np.asarray(labels, dtype=np.int64).ravel()
        if labels_arr.size != len(texts):
            raise FedLoraError(f"{len(texts)} texts but {labels_arr.size} labels; give one label per text")
        self.max_length = int(max_length)
        self.labels = labels_arr
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_token_id = int(pad) if isinstance(pad, int) else 0

        lengths = np.zeros(len(texts), dtype=np.int64)
        chunks: list[np.ndarray] = []
        for start in range(0, len(texts), _CHUNK):
            batch_texts = [str(t) for t in texts[start : start + _CHUNK]]
            encoded = tokenizer(
                batch_texts,
                truncation=True,
                max_length=self.max_length,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            ids: list[list[int]] = encoded["input_ids"]
            lengths[start : start + len(ids)] = [len(seq) for seq in ids]
            if ids:
                chunks.append(np.fromiter((tok for seq in ids for tok in seq), dtype=np.int32))
        self.lengths = lengths
        self._flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        self._offsets = np.zeros(len(texts), dtype=np.int64)
        if len(texts) > 1:
            np.cumsum(lengths[:-1], out=self._offsets[1:])
        # Sentinel at the end of the flat array: padded positions index it.
        self._flat = np.append(self._flat, np.int32(self.pad_token_id))
        self._pad_position = self._flat.size - 1
        self._columns = np.arange(self.max_length, dtype=np.int64)

    def __len__(self) -> int:
        """Return the number of examples."""
        return int(self.lengths.size)

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Build a right-padded batch.

        Parameters
        ----------
        indices : sequence of int or numpy.ndarray
            Positions of the examples, in batch order.

        Returns
        -------
        dict of str to torch.Tensor
            ``"input_ids"`` and ``"attention_mask"`` of shape ``[len(indices), longest]``
            (``longest`` = the longest example in the batch, at least 1) and ``"labels"`` of
            shape ``[len(indices)]``, all ``torch.long``. Padding uses :attr:`pad_token_id`.
        """
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        width = max(int(lengths.max()) if lengths.size else 0, 1)
        cols = self._columns[:width]
        mask = cols[None, :] < lengths[:, None]
        positions = np.where(mask, self._offsets[idx][:, None] + cols[None, :], self._pad_position)
        return {
            "input_ids": torch.from_numpy(self._flat[positions].astype(np.int64)),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(self.labels[idx]),
        }
