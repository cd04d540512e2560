"""Hugging Face transformers models for the benchmarks, built from configs (nothing
is downloaded), as thin wrappers that return logits (what a user writes)."""

from __future__ import annotations

import torch


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


class GPT2LM(torch.nn.Module):
    """A GPT-2 language model (tied input and output embeddings, ``Conv1D``
    layers), next-token logits ``(n, T, vocab)``."""

    def __init__(self, vocab_size=128, n_positions=64, n_embd=128, n_layer=4, n_head=4, dropout=0.1):
        super().__init__()
        transformers = _quiet()
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


class BertClassifier(torch.nn.Module):
    """A BERT sequence classifier on padded ids with a 0/1 attention mask."""

    def __init__(self, vocab_size=128, n_labels=2, hidden=128, n_layer=4, n_head=4, max_len=64, dropout=0.1):
        super().__init__()
        transformers = _quiet()
        config = transformers.BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            intermediate_size=2 * hidden,
            max_position_embeddings=max_len,
            num_labels=n_labels,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.model = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class LlamaClassifier(torch.nn.Module):
    """A Llama-style sequence classifier (RMS norms, rotary positions, gated MLPs,
    the last token's logits), on token ids."""

    def __init__(self, vocab_size=128, n_labels=2, hidden=128, n_layer=4, n_head=4, max_len=64):
        super().__init__()
        transformers = _quiet()
        config = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=max_len,
            num_labels=n_labels,
            pad_token_id=0,
        )
        self.model = transformers.LlamaForSequenceClassification(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


class ViTClassifier(torch.nn.Module):
    """A ViT image classifier: patch embeddings, a class token and position
    embeddings broadcast to the batch, on ``(n, 3, 32, 32)`` images."""

    def __init__(self, n_labels=10, hidden=64, n_layer=2, n_head=4, image_size=32, patch_size=4, dropout=0.0):
        super().__init__()
        transformers = _quiet()
        config = transformers.ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=3,
            hidden_size=hidden,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            intermediate_size=2 * hidden,
            num_labels=n_labels,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.model = transformers.ViTForImageClassification(config)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits
