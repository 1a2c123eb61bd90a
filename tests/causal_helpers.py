"""Tiny random causal LMs (GPT-2 and Llama configs) with a word-level tokenizer, built in the test: nothing
is downloaded. ``fine_tune_copy`` writes a fine-tuned copy the way a user's training script would
(``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a movie film was is good bad great awful fine plot actors story boring fun sentence one two "
         "yes no positive negative acceptable unacceptable answer question cat dog sat on mat and but not very "
         "Answer: :").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_tokenizer(words: tuple[str, ...] | list[str] = WORDS):
    """A whitespace word-level tokenizer with pad/unk/bos/eos (BOS added in front of every text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_causal_lm(family: str = "llama", vocab_size: int | None = None, tie: bool = True, seed: int = 0,
                   hidden: int = 32, layers: int = 2):
    """A randomly initialised GPT-2 or Llama ``*ForCausalLM`` of a few thousand parameters."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab_size = vocab_size or len(SPECIALS) + len(set(WORDS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "gpt2":
            config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64,
                                tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=0)
            return GPT2LMHeadModel(config).eval()
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3,
                             pad_token_id=0)
        return LlamaForCausalLM(config).eval()


def save_causal_lm(model, path: str | Path, tokenizer=None) -> str:
    path = Path(path)
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return str(path)


def fine_tune_copy(pretrained_dir: str | Path, path: str | Path, scale: float = 0.05, seed: int = 1,
                   tokenizer=None) -> str:
    """θ_pre plus seeded Gaussian noise of relative size ``scale`` on every floating tensor, saved like a user's
    fine-tune (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * parameter.detach().abs().mean() * noise)
    return save_causal_lm(model, path, tokenizer)


def make_family(tmp_path: Path, family: str = "llama", tie: bool = True, count: int = 2,
                scales: tuple[float, ...] = (0.05, 0.2, 0.1)) -> tuple[str, list[str]]:
    """θ_pre and ``count`` fine-tuned copies under ``tmp_path``."""
    pretrained = save_causal_lm(tiny_causal_lm(family, tie=tie), tmp_path / f"{family}-pre")
    finetuned = [fine_tune_copy(pretrained, tmp_path / f"{family}-ft{i}", scale=scales[i % len(scales)], seed=i + 1)
                 for i in range(count)]
    return pretrained, finetuned
