"""Hugging Face causal language models (``AutoModelForCausalLM``) as distac models.

The whole network, ``lm_head`` included, is the backbone a task vector covers; a tied ``lm_head`` shares the
embedding's storage and is one tensor (the embedding's key), merged once. A generative task's "head" holds no
weights: it is the task's candidate completions (label words, or the distinct completions of
prompt/completion data) as token ids, so every classifier-shaped route works unchanged:

- ``model(inputs)`` → [batch, candidates]: the summed log-likelihood of each candidate after the prompt, the
  way lm-eval-harness scores multiple choice; accuracy, normalized accuracy and the α search use it as logits;
- ``distillation_outputs(inputs)`` → next-token logits [batch, length, vocab] and the non-padding mask: what
  DisTaC distils, token by token;
- ``confidence_logits(inputs)`` → the next-token logits at the end of each prompt [batch, vocab]: the
  distribution over the first completion token, whose max probability is the diagnosis' confidence;
- ``supervised_loss(inputs, labels)`` → cross-entropy on the gold completion's tokens only (SFT);
- ``completion_nll(inputs, labels)`` → per-example summed negative log-likelihood and token count of the gold
  completion, for perplexity.

Prompts are the task's inputs formatted by ``template`` (``{text_a}``, ``{text_b}``; default: the text, or
both texts on two lines) and right-padded; a candidate is ``separator + name`` unless the name starts with
whitespace, tokenized without special tokens and appended after each prompt's last real token.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distac.data.examples import TextExample
from distac.errors import CheckpointError, ConfigError, DistacError, MismatchError
from distac.models.base import ModelAdapter, TaskModel
from distac.models.text import TRANSFORMERS_LOADING

log = logging.getLogger(__name__)

KIND = "hf_causal_lm"
IGNORE = -100



def load_causal_lm_weights(path: str) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in eval mode, its tied embeddings tied."""
    from transformers import AutoModelForCausalLM

    from distac.models.hf_seqcls import local_files_only, quiet_transformers

    quiet_transformers()
    try:
        with TRANSFORMERS_LOADING:
            full = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_files_only(path))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load {path} as a causal language model: {exc}") from None
    if getattr(full.config, "tie_word_embeddings", False) and not tied_aliases(full):
        output, embedding = full.get_output_embeddings(), full.get_input_embeddings()
        if output is not None and output.weight.shape == embedding.weight.shape:
            output.weight = embedding.weight  # tied: one tensor, whatever state the load left it in
    return full.eval()


def untied_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's floating state, detached and cloned, with each shared storage (a tied ``lm_head``) under its
    first key only."""
    seen: set[int] = set()
    state = {}
    for key, value in module.state_dict().items():
        if not value.is_floating_point():
            continue
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        state[key] = value.detach().clone()
    return state


def tied_aliases(module: nn.Module) -> set[str]:
    """The state-dict keys whose storage an earlier key already holds (a tied ``lm_head.weight``)."""
    seen: set[int] = set()
    aliases = set()
    for key, value in module.state_dict().items():
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            aliases.add(key)
        seen.add(pointer)
    return aliases


class CandidateHead(nn.Module):
    """A generative task's candidate completions as token ids (padded [C, width] and lengths [C]); no weights."""

    def __init__(self, candidates: Sequence[Sequence[int]]):
        super().__init__()
        width = max((len(c) for c in candidates), default=0)
        ids = torch.zeros(len(candidates), max(width, 1), dtype=torch.long)
        for row, tokens in enumerate(candidates):
            if not tokens:
                raise ConfigError(f"candidate completion {row} has no tokens")
            ids[row, :len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        self.register_buffer("candidate_ids", ids)
        self.register_buffer("candidate_lengths", torch.tensor([len(c) for c in candidates], dtype=torch.long))

    @property
    def num_candidates(self) -> int:
        return int(self.candidate_lengths.numel())

    def candidate(self, index: int) -> torch.Tensor:
        return self.candidate_ids[index, :int(self.candidate_lengths[index])]

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - scoring lives on the model
        raise DistacError("a generative task's head scores candidates through CausalLMTaskModel.forward")


def append_continuations(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         continuations: Sequence[torch.Tensor], pad_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row r = prompt r (its real tokens) + continuation r, right-padded. Returns (ids, mask, targets) where
    ``targets[r, p]`` is the token position p predicts (the next token) when that token is a continuation
    token, else ``IGNORE``."""
    lengths = attention_mask.sum(dim=1).tolist()
    width = max(int(n) + len(c) for n, c in zip(lengths, continuations))
    rows = len(continuations)
    device = input_ids.device
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(rows, width, dtype=attention_mask.dtype, device=device)
    targets = torch.full((rows, width), IGNORE, dtype=torch.long, device=device)
    for row, (n, continuation) in enumerate(zip(lengths, continuations)):
        n, k = int(n), len(continuation)
        if n == 0:
            raise DistacError("a prompt has no tokens: the candidates have nothing to follow")
        ids[row, :n] = input_ids[row, :n]
        ids[row, n:n + k] = continuation.to(device)
        mask[row, :n + k] = 1
        targets[row, n - 1:n + k - 1] = continuation.to(device)
    return ids, mask, targets


def target_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits rows that predict a target token [N, V], those tokens [N] and their row index [N]."""
    where = targets != IGNORE
    return logits[where], targets[where], where.nonzero()[:, 0]


class CausalLMTaskModel(TaskModel):
    """A causal LM (the backbone, all of it) with a task's candidate completions (the head)."""

    def __init__(self, backbone: nn.Module, head: CandidateHead, pad_token_id: int):
        super().__init__(backbone, head)
        self.pad_token_id = pad_token_id
        self._input_names = set(inspect.signature(backbone.forward).parameters)

    # ---- the network

    def token_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits [batch, length, vocab]."""
        return self.backbone(**{k: v for k, v in inputs.items() if k in self._input_names}, use_cache=False).logits

    def _continued(self, inputs: Mapping[str, torch.Tensor], continuations: Sequence[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [N, V], target tokens [N], row [N]) of each continuation token after its prompt."""
        ids, mask, targets = append_continuations(inputs["input_ids"], inputs["attention_mask"], continuations,
                                                  self.pad_token_id)
        logits = self.token_logits({"input_ids": ids, "attention_mask": mask})
        return target_logits(logits, targets)

    def _last_prompt_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = self.token_logits(inputs)
        last = inputs["attention_mask"].sum(dim=1).clamp(min=1) - 1
        return logits[torch.arange(logits.shape[0], device=logits.device), last]

    # ---- what the classifier-shaped routes call

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log P(candidate c | prompt), summed over the candidate's tokens: [batch, candidates]."""
        head: CandidateHead = self.head
        if head.num_candidates == 0:
            raise ConfigError("this causal LM has no candidate completions: give the task's label words "
                              "(class names) or prompt/completion data to score it")
        if bool((head.candidate_lengths == 1).all()):  # one token each: one forward pass over the prompts
            log_probs = F.log_softmax(self._last_prompt_logits(inputs).float(), dim=-1)
            return log_probs[:, head.candidate_ids[:, 0]]
        batch, count = inputs["input_ids"].shape[0], head.num_candidates
        expanded = {k: v.repeat_interleave(count, dim=0) for k, v in inputs.items()}
        continuations = [head.candidate(c) for _ in range(batch) for c in range(count)]
        logits, tokens, rows = self._continued(expanded, continuations)
        token_log_probs = F.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
        scores = torch.zeros(batch * count, device=logits.device).index_add_(0, rows, token_log_probs)
        return scores.view(batch, count)

    def features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise DistacError("a causal LM has no pooled features: mixup does not apply to it")

    def distillation_outputs(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_logits(inputs), inputs["attention_mask"].bool()

    def confidence_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._last_prompt_logits(inputs)

    def _gold(self, labels: torch.Tensor) -> list[torch.Tensor]:
        head: CandidateHead = self.head
        if head.num_candidates == 0:
            raise ConfigError("this causal LM has no candidate completions to train or score on")
        return [head.candidate(int(label)) for label in labels.tolist()]

    def supervised_loss(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
        """Token-level cross-entropy on the gold completions only (prompt tokens carry no loss)."""
        logits, tokens, _ = self._continued(inputs, self._gold(labels))
        return F.cross_entropy(logits.float(), tokens, label_smoothing=label_smoothing)

    def completion_nll(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the gold completion's summed negative log-likelihood and its token count."""
        logits, tokens, rows = self._continued(inputs, self._gold(labels))
        nll = F.cross_entropy(logits.float(), tokens, reduction="none")
        batch = labels.shape[0]
        total = torch.zeros(batch, device=nll.device).index_add_(0, rows, nll)
        count = torch.zeros(batch, device=nll.device).index_add_(0, rows, torch.ones_like(nll))
        return total, count

    # ---- weights

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return untied_state(self.backbone)

    def load_backbone(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.backbone.state_dict()
        aliases = tied_aliases(self.backbone)
        missing = [k for k, v in own.items() if v.is_floating_point() and k not in state and k not in aliases]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise MismatchError(f"weights do not fit the causal LM: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value.to(own[key].dtype))


class HFCausalLMAdapter(ModelAdapter):
    """Spec: ``{"kind": "hf_causal_lm", "name_or_path": θ_pre (HF dir or hub id), "tokenizer": dir | None,
    "max_length": 256, "template": None | "...{text_a}...", "separator": " "}``."""

    kind = KIND

    def __init__(self, name_or_path: str, tokenizer: str | None = None, max_length: int = 256,
                 template: str | None = None, separator: str = " "):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ConfigError(f"{KIND}: max_length must be an integer ≥ 2, got {max_length!r}")
        if template is not None and "{text_a}" not in template:
            raise ConfigError(f"{KIND}: template must contain {{text_a}}, got {template!r}")
        self.name_or_path = str(name_or_path)
        self.tokenizer_path = str(tokenizer) if tokenizer else None
        self.max_length = max_length
        self.template = template
        self.separator = separator
        self._full, self.tokenizer = self._load()
        self._pretrained_state = untied_state(self._full)
        self._prefix, self._suffix = self._special_tokens()

    def _load(self) -> tuple[nn.Module, Any]:
        from transformers import AutoTokenizer

        from distac.models.hf_seqcls import TOKENIZER_FILES, has_tokenizer, local_files_only, quiet_transformers
        from distac.models.text import resolve_model_path

        path = resolve_model_path(self.name_or_path)
        tokenizer_path = self.tokenizer_path or path
        if not has_tokenizer(tokenizer_path):
            raise CheckpointError(f"{tokenizer_path} holds no tokenizer (looked for {', '.join(TOKENIZER_FILES)}); "
                                  "save one beside the weights (tokenizer.save_pretrained) or name it with "
                                  "`tokenizer`")
        quiet_transformers()
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=local_files_only(tokenizer_path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizer from {tokenizer_path}: {exc}") from None
        full = load_causal_lm_weights(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise CheckpointError(f"the tokenizer of {tokenizer_path} has no pad, eos or unk token to pad with")
        tokenizer.padding_side = "right"
        return full, tokenizer

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text (BOS kept, a trailing EOS dropped)."""
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("x")["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start], full[start + len(plain):]
        return [], []

    @property
    def config(self) -> Any:
        return self._full.config

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name_or_path": self.name_or_path, "tokenizer": self.tokenizer_path,
                "max_length": self.max_length, "template": self.template, "separator": self.separator}

    def pretrained_backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._pretrained_state.items()}

    def candidate_tokens(self, class_names: Sequence[str]) -> list[list[int]]:
        """Each completion's token ids (``separator`` in front unless it starts with whitespace)."""
        tokens = []
        for name in class_names:
            text = name if name[:1].isspace() else self.separator + name
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"completion {name!r} tokenizes to nothing")
            tokens.append(ids)
        if len({tuple(t) for t in tokens}) != len(tokens):
            raise ConfigError(f"completions {list(class_names)} do not all tokenize differently")
        return tokens

    def wrap(self, full: nn.Module, class_names: Sequence[str] | None) -> CausalLMTaskModel:
        head = CandidateHead(self.candidate_tokens(class_names) if class_names else [])
        return CausalLMTaskModel(full, head, int(self.tokenizer.pad_token_id)).eval()

    def build(self, num_classes: int, class_names: Sequence[str] | None = None, seed: int = 0) -> CausalLMTaskModel:
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{num_classes} classes but {len(class_names)} class names")
        if num_classes and not class_names:
            raise ConfigError(f"{KIND}: a generative task needs its completions (label words as class names) "
                              f"to score {num_classes} classes")
        return self.wrap(copy.deepcopy(self._full), class_names)

    def load_finetuned(self, path: str, class_names: Sequence[str] | None) -> CausalLMTaskModel:
        """A fine-tuned causal-LM directory of θ_pre's architecture, weights exactly as transformers loads them."""
        full = load_causal_lm_weights(path)
        if type(full) is not type(self._full):
            raise CheckpointError(f"{path} is a {type(full).__name__}, but the pretrained model "
                                  f"{self.name_or_path} is a {type(self._full).__name__}")
        return self.wrap(full, class_names)

    def prompt(self, example: TextExample) -> str:
        if self.template is not None:
            return self.template.format(text_a=example.text_a, text_b=example.text_b or "")
        return example.text_a if example.text_b is None else f"{example.text_a}\n{example.text_b}"

    def collate(self, examples: Sequence[TextExample]) -> dict[str, torch.Tensor]:
        """Prompts tokenized (the tokenizer's leading special tokens, no trailing EOS), cut from the left to
        ``max_length`` so the end of the prompt, which the completion follows, is kept, and right-padded."""
        if not examples:
            raise DistacError("cannot collate an empty batch")
        texts = [self.prompt(example) for example in examples]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        budget = self.max_length - len(self._prefix)
        rows = [self._prefix + ids[-budget:] if len(ids) > budget else self._prefix + ids for ids in encoded]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, :len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def create_random_causal_lm(path: str, family: str = "llama", hidden: int = 32, layers: int = 2,
                            seed: int = 0) -> str:
    """Write a tiny randomly initialised Llama or GPT-2 causal LM with the bundled MiniLM tokenizer (a real
    30k-token vocabulary, so GLUE text tokenizes) to ``path``: the causal-LM profile's θ_pre for tests."""
    import shutil
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from distac.models.text import TOKENIZER_FILES, bundled_minilm_path

    tokenizer_dir = Path(bundled_minilm_path())
    special = {"bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}  # [CLS], [SEP], [PAD]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=hidden, n_layer=layers, n_head=2,
                                               n_positions=256, **special))
        elif family == "llama":
            model = LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=2 * hidden,
                                                 num_hidden_layers=layers, num_attention_heads=2,
                                                 num_key_value_heads=2, max_position_embeddings=256,
                                                 tie_word_embeddings=True, **special))
        else:
            raise ConfigError(f"family must be 'llama' or 'gpt2', got {family!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out / name)
    return str(out)
