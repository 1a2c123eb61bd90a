"""Pretrain a small causal language model (a few-million-parameter Llama) from the GLUE text on disk.

The causal-LM benchmark fine-tunes a pretrained model on GLUE tasks as generation and merges the fine-tunes;
no pretrained checkpoint can be downloaded here, so this script builds one, reproducibly, from the sentences of
CoLA, MRPC, RTE and SST-2 (train + dev, labels ignored):

1. every sentence (both sides of a pair), stripped and de-duplicated, is read with ``distac.data.glue``'s parser;
   a seeded ``holdout_fraction`` of them is kept out of everything below, for a held-out perplexity;
2. a byte-level BPE tokenizer (``<pad> <unk> <s> </s>``, BOS put in front of every text) is trained on the rest;
3. ``LlamaForCausalLM`` is initialised from ``seed`` and trained on the sentences packed into blocks
   (``<s> sentence </s> <s> sentence </s> ...``; the free "BOS after EOS" targets are masked) with next-token
   loss, AdamW, linear warm-up and a cosine decay;
4. OUT gets the model (safetensors), the tokenizer and ``pretrain.json``: the params, the train loss, the held-out
   perplexity next to the unigram baseline's, wall time, parameter count and a fingerprint.

The fingerprint is the sha256 of the params, this file's and the GLUE parser's source, the data (each file's
name, size and content hash, or the texts given) and the torch / transformers / tokenizers versions. A call whose
fingerprint matches OUT's ``pretrain.json`` prints ``reused OUT`` and returns at once. The model is built in a
temporary directory beside OUT, checked (loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``, generates)
and renamed into place only then.

    .venv/bin/python -m benchmarks.causal_lm.pretrain --out runs/causal_lm/pretrained
    .venv/bin/python -m benchmarks.causal_lm.pretrain --out runs/causal_lm/quick --steps 20   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distac.errors import DistacError, OutputError

RECORD = "pretrain.json"
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3
PAD, UNK, BOS, EOS = SPECIALS
GLUE_TASKS = ("cola", "mrpc", "rte", "sst2")
# Fields that change how a run looks, not what it computes: left out of the fingerprint.
COSMETIC = ("glue_dir", "log_every", "progress")


@dataclass(frozen=True)
class PretrainParams:
    """Everything a pretraining run depends on besides the data. Defaults: the benchmark's model, sized so the
    run takes about 9 minutes on 2 CPU cores."""

    # data
    glue_dir: str | None = None  # None: distac's lookup ($DISTAC_GLUE_DIR, then ../shared/data/glue)
    holdout_fraction: float = 0.02
    seed: int = 0
    # tokenizer
    vocab_size: int = 4096
    # model (LlamaConfig)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    max_positions: int = 256
    # training
    steps: int = 850
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_fraction: float = 0.1  # the cosine decays to lr * this
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 2
    minutes_budget: float | None = None  # stop training early (and record it) once this much time has passed
    # display
    log_every: int = 25
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise DistacError(f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise DistacError("steps, batch_size and log_every must be at least 1")
        if not 2 <= self.seq_len <= self.max_positions:
            raise DistacError(f"seq_len {self.seq_len} must lie in [2, max_positions={self.max_positions}]")
        if self.hidden_size % self.num_heads:
            raise DistacError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.vocab_size <= len(SPECIALS) + 256:
            raise DistacError(f"vocab_size {self.vocab_size} leaves no room for merges (need > 260)")


# --------------------------------------------------------------------------------------------- data


def glue_files(glue_dir: Path) -> list[Path]:
    """The tsv files read, in a fixed order; a missing directory or file raises naming it."""
    from distac.data.glue import GLUE_TASKS as FORMATS

    if not glue_dir.is_dir():
        raise DistacError(f"GLUE directory not found: {glue_dir} (pass --glue-dir, or set $DISTAC_GLUE_DIR)")
    files = [glue_dir / FORMATS[task].directory / f"{split}.tsv" for task in GLUE_TASKS for split in ("train", "dev")]
    for path in files:
        if not path.is_file():
            raise DistacError(f"GLUE file not found: {path}")
    return files


def resolve_glue_dir(glue_dir: str | None) -> Path:
    from distac.data.glue import find_glue_root

    root = find_glue_root(glue_dir)
    if root is None:
        raise DistacError("no GLUE directory found: pass --glue-dir, set $DISTAC_GLUE_DIR, or place it at "
                          "../shared/data/glue")
    return root


def glue_sentences(glue_dir: Path) -> list[str]:
    """Every sentence of the GLUE files (train + dev, both sides of a pair), in file order."""
    from distac.data.glue import GLUE_TASKS as FORMATS
    from distac.data.glue import read_glue_splits

    glue_files(glue_dir)  # names a missing file before parsing starts
    sentences: list[str] = []
    for task in GLUE_TASKS:
        for split in read_glue_splits(task, glue_dir):
            for example in split:
                sentences.append(example.text_a)
                if FORMATS[task].text_b_column is not None and example.text_b is not None:
                    sentences.append(example.text_b)
    return sentences


def clean(texts: Sequence[str]) -> list[str]:
    """Stripped, non-empty, exact duplicates dropped (first occurrence kept): a duplicate on both sides of the
    held-out split would flatter the held-out perplexity."""
    return list(dict.fromkeys(text.strip() for text in texts if text.strip()))


def split_holdout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded ``fraction`` (at least one text) held out, both in their original order."""
    if len(texts) < 2:
        raise DistacError(f"need at least 2 distinct texts to hold some out, got {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(fraction * len(texts)))])
    return ([t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_identity(texts: Sequence[str] | None, glue_dir: Path | None) -> dict[str, Any]:
    """What the fingerprint knows of the data: each GLUE file's relative name, size and sha256, or the texts'."""
    if texts is not None:
        digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
        return {"texts": {"count": len(texts), "sha256": digest}}
    assert glue_dir is not None
    return {"glue": [{"file": path.relative_to(glue_dir).as_posix(), "bytes": path.stat().st_size,
                      "sha256": sha256_file(path)} for path in glue_files(glue_dir)]}


def fingerprint(params: PretrainParams, data: dict[str, Any]) -> str:
    """sha256 of the params (less the cosmetic ones), the code, the data and the library versions."""
    import tokenizers
    import transformers

    import distac.data.glue

    payload = {
        "params": {k: v for k, v in dataclasses.asdict(params).items() if k not in COSMETIC},
        "code": {name: hashlib.sha256(Path(path).read_bytes()).hexdigest()
                 for name, path in (("pretrain.py", __file__), ("glue.py", distac.data.glue.__file__))},
        "data": data,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``: no text is out of vocabulary, a space
    is put before the first word (so a word tokenizes alike at the start and inside a text), BOS in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=max_length, padding_side="right")


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text as ``<s> ids </s>`` (through the Rust tokenizer: no warning about texts longer than a block,
    which packing splits anyway)."""
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [[tokenizer.bos_token_id, *item.ids, tokenizer.eos_token_id] for item in encoded]


def pack(sequences: list[list[int]], seq_len: int, seed: int) -> torch.Tensor:
    """The sequences in a seeded order, concatenated and cut into [blocks, seq_len] (the tail dropped)."""
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    stream = [token for index in order for token in sequences[index]]
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise DistacError(f"the corpus has {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(stream[:blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


def batches(blocks: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of blocks, reshuffled each epoch (an epoch's last partial batch is dropped)."""
    per_epoch = max(1, blocks.shape[0] // batch_size)
    while True:
        order = torch.randperm(blocks.shape[0], generator=generator)
        for start in range(per_epoch):
            yield blocks[order[start * batch_size:(start + 1) * batch_size]]


# --------------------------------------------------------------------------------------------- model


def build_model(params: PretrainParams, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=params.hidden_size, intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers, num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_heads, max_position_embeddings=params.max_positions,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(params.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, params: PretrainParams) -> float:
    """Linear warm-up to ``lr`` over ``warmup_fraction`` of the steps, then a cosine down to lr·min_lr_fraction."""
    warmup = max(1, round(params.warmup_fraction * params.steps))
    if step < warmup:
        return params.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, params.steps - warmup)
    floor = params.lr * params.min_lr_fraction
    return floor + (params.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def optimizer_for(model, params: PretrainParams) -> torch.optim.Optimizer:
    """AdamW; weight decay on the 2-D projection matrices only (not the norms or the tied embedding)."""
    embedding = model.get_input_embeddings().weight
    decay = [p for p in model.parameters() if p.ndim >= 2 and p is not embedding]
    rest = [p for p in model.parameters() if p.ndim < 2 or p is embedding]
    return torch.optim.AdamW([{"params": decay, "weight_decay": params.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=params.lr, betas=(0.9, 0.95))


@torch.no_grad()
def heldout_nll(model, sequences: list[list[int]], max_len: int, batch_size: int = 64) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) over ``<s> text </s>`` sequences, each scored on its own."""
    model.eval()
    sequences = sorted((seq[:max_len] for seq in sequences), key=len)  # less padding
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(seq) for seq in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets, keep = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total += float(nll[keep].sum())
        count += int(keep.sum())
    model.train()
    return total, count


def unigram_perplexity(train: list[list[int]], heldout: list[list[int]], vocab: int) -> float:
    """The held-out perplexity of add-one-smoothed unigram frequencies of the training targets: the bar a
    language model must clear to have learnt anything beyond word frequencies."""
    counts = torch.ones(vocab, dtype=torch.float64)
    for seq in train:
        counts.index_add_(0, torch.tensor(seq[1:]), torch.ones(len(seq) - 1, dtype=torch.float64))
    log_probs = counts.log() - counts.sum().log()
    targets = torch.tensor([token for seq in heldout for token in seq[1:]])
    return float(torch.exp(-log_probs[targets].mean()))


# --------------------------------------------------------------------------------------------- the run


def _read_record(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / RECORD).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _check_replaceable(out: Path) -> None:
    """OUT may be replaced only when it does not exist, is empty, or is an earlier output of this script."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    if any(out.iterdir()) and not (out / RECORD).is_file():
        raise OutputError(f"output {out} holds files this script did not write (no {RECORD}); "
                          "choose another --out or remove it")


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def train(model, blocks: torch.Tensor, params: PretrainParams, started: float) -> dict[str, Any]:
    """The training loop; returns steps done, the final train loss (mean of the last ``log_every`` steps) and
    whether the minutes budget stopped it."""
    from tqdm import tqdm

    optimizer = optimizer_for(model, params)
    generator = torch.Generator().manual_seed(params.seed)
    stream = batches(blocks, params.batch_size, generator)
    recent: list[float] = []
    stopped_by_budget, step = False, 0
    model.train()
    bar = tqdm(range(params.steps), desc="pretrain", unit="step", disable=not params.progress, mininterval=1.0)
    for step in bar:
        if params.minutes_budget is not None and time.monotonic() - started > 60 * params.minutes_budget:
            stopped_by_budget = True
            _say(f"minutes budget {params.minutes_budget} reached: stopping at step {step} of {params.steps}")
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, params)
        batch = next(stream)
        labels = batch.masked_fill(batch == model.config.bos_token_id, -100)  # "<s> after </s>" is free
        loss = model(input_ids=batch, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        optimizer.step()
        recent = (recent + [loss.detach().item()])[-params.log_every:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}", refresh=False)
        if (step + 1) % params.log_every == 0 or step + 1 == params.steps:
            _say(f"step {step + 1}/{params.steps}  loss {sum(recent) / len(recent):.4f}  "
                 f"lr {lr_at(step, params):.2e}  elapsed {time.monotonic() - started:.0f} s")
    else:
        step = params.steps
    bar.close()
    return {"steps_done": step, "stopped_by_budget": stopped_by_budget,
            "final_train_loss": sum(recent) / len(recent) if recent else None}


def check_saved(path: Path, prompt: str = "the movie") -> str:
    """Load ``path`` the way a user would and greedily continue ``prompt``: the published model must work."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(generated[0], skip_special_tokens=True).strip()


def pretrain(out: str, params: PretrainParams | None = None, texts: Sequence[str] | None = None) -> str:
    """Build the pretrained model at ``out`` (or reuse it when its fingerprint matches) and return ``out``.

    The corpus is ``texts`` when given (tests, other corpora), else every sentence of the GLUE files under
    ``params.glue_dir``.
    """
    params = params or PretrainParams()
    out_path = Path(out)
    glue_dir = None if texts is not None else resolve_glue_dir(params.glue_dir)
    data = data_identity(list(texts) if texts is not None else None, glue_dir)
    fp = fingerprint(params, data)
    previous = _read_record(out_path)
    if previous is not None and previous.get("fingerprint") == fp:
        print(f"reused {out_path}")
        return str(out_path)
    _check_replaceable(out_path)

    started = time.monotonic()
    corpus = clean(texts if texts is not None else glue_sentences(glue_dir))
    train_texts, heldout_texts = split_holdout(corpus, params.holdout_fraction, params.seed)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(params.threads)
        with torch.random.fork_rng(devices=[]):
            record = _build(temp, params, train_texts, heldout_texts, started)
        record.update(fingerprint=fp, data=data, corpus={
            "source": "texts" if texts is not None else str(glue_dir), "distinct_texts": len(corpus),
            "train_texts": len(train_texts), "heldout_texts": len(heldout_texts), **record.pop("corpus")})
        record["wall_s"] = round(time.monotonic() - started, 1)
        (temp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")  # the marker, last
        _publish(temp, out_path)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(temp, ignore_errors=True)
    _say(f"wrote {out_path}: {record['parameters']:,} parameters, {record['steps_done']} steps in "
         f"{record['wall_s']:.0f} s, train loss {record['final_train_loss']:.3f}, held-out perplexity "
         f"{record['heldout_perplexity']:.1f} (unigram {record['unigram_perplexity']:.1f})")
    return str(out_path)


def _build(temp: Path, params: PretrainParams, train_texts: list[str], heldout_texts: list[str],
           started: float) -> dict[str, Any]:
    """Tokenizer, model, training, evaluation and the saved files in ``temp``; returns the record's numbers."""
    from distac.models.hf_seqcls import quiet_transformers

    quiet_transformers()  # no weight-writing / loading bars around ours
    tokenizer = train_tokenizer(train_texts, params.vocab_size, params.max_positions)
    _say(f"tokenizer trained ({time.monotonic() - started:.0f} s elapsed)")
    train_seqs, heldout_seqs = encode(tokenizer, train_texts), encode(tokenizer, heldout_texts)
    blocks = pack(train_seqs, params.seq_len, params.seed)
    model = build_model(params, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    _say(f"{len(train_texts)} train / {len(heldout_texts)} held-out texts, vocab {len(tokenizer)}, "
         f"{blocks.numel():,} train tokens in {blocks.shape[0]} blocks of {params.seq_len}; {n_params:,} parameters")
    initial_nll, count = heldout_nll(model, heldout_seqs, params.max_positions)
    setup_s = time.monotonic() - started
    train_started = time.monotonic()
    result = train(model, blocks, params, started)
    train_s = time.monotonic() - train_started
    nll, count = heldout_nll(model, heldout_seqs, params.max_positions)
    model.save_pretrained(temp, safe_serialization=True)
    tokenizer.save_pretrained(temp)
    for path in temp.iterdir():  # safetensors' file is written 0600; the model is meant to be shared
        path.chmod(0o644)
    sample = check_saved(temp)
    tokens_seen = result["steps_done"] * params.batch_size * params.seq_len
    return {
        "params": dataclasses.asdict(params),
        **result,
        "heldout_perplexity": math.exp(nll / count),
        "heldout_nll": nll / count,
        "initial_heldout_perplexity": math.exp(initial_nll / count),
        "unigram_perplexity": unigram_perplexity(train_seqs, heldout_seqs, len(tokenizer)),
        "heldout_tokens": count,
        "parameters": n_params,
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / blocks.numel(), 3),
        "sample": {"prompt": "the movie", "greedy": sample},
        "files_sha256": {name: sha256_file(temp / name) for name in ("model.safetensors", "tokenizer.json")},
        "corpus": {"train_tokens": blocks.numel(), "vocab": len(tokenizer)},
    }


def _publish(temp: Path, out: Path) -> None:
    """Move the finished ``temp`` to ``out``; an earlier output there is set aside first and removed after."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    temp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (model, tokenizer, pretrain.json)")
    parser.add_argument("--steps", type=int, default=PretrainParams.steps)
    parser.add_argument("--glue-dir", default=None, help="GLUE directory (default: ../shared/data/glue)")
    parser.add_argument("--minutes-budget", type=float, default=None,
                        help="stop training after this many minutes (recorded in pretrain.json)")
    parser.add_argument("--seed", type=int, default=PretrainParams.seed)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    params = PretrainParams(steps=args.steps, glue_dir=args.glue_dir, minutes_budget=args.minutes_budget,
                            seed=args.seed, progress=not args.no_progress)
    try:
        pretrain(args.out, params)
    except DistacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
