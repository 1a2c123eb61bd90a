"""Tokenizers of θ_pre and a fine-tune compared before any work: merging models whose token ids mean different
things gives a model that looks fine and is garbage, so a different vocabulary is an error naming both files."""

from __future__ import annotations

import os
from typing import Any

from distac.errors import MismatchError


def tokenizer_file(directory: str) -> str | None:
    """The file that defines a directory's tokenizer (the first of transformers' names present), or None."""
    from distac.models.hf_seqcls import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def _load(directory: str) -> Any:
    from transformers import AutoTokenizer

    from distac.models.hf_seqcls import quiet_transformers

    quiet_transformers()
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def vocabulary_difference(pretrained: Any, finetuned: Any) -> str | None:
    """What differs between two tokenizers' vocabularies and special tokens, in words; None when nothing."""
    ours, theirs = pretrained.get_vocab(), finetuned.get_vocab()
    if len(ours) != len(theirs):
        return f"{len(theirs)} tokens against {len(ours)}"
    for token, index in ours.items():
        if theirs.get(token) != index:
            return f"token {token!r} has id {theirs.get(token)} against {index}"
    for name in ("bos_token_id", "eos_token_id", "unk_token_id"):
        if getattr(pretrained, name, None) != getattr(finetuned, name, None):
            return f"{name} {getattr(finetuned, name, None)} against {getattr(pretrained, name, None)}"
    return None


def check_same_tokenizer(pretrained_dir: str, finetuned_dir: str, pretrained_uri: str = "",
                         finetuned_uri: str = "") -> None:
    """Raise MismatchError when the fine-tune ships a tokenizer whose vocabulary differs from θ_pre's.

    A fine-tune without tokenizer files is served with θ_pre's tokenizer, so there is nothing to compare."""
    ours, theirs = tokenizer_file(pretrained_dir), tokenizer_file(finetuned_dir)
    if theirs is None or ours is None or os.path.samefile(pretrained_dir, finetuned_dir):
        return
    difference = vocabulary_difference(_load(pretrained_dir), _load(finetuned_dir))
    if difference is not None:
        shown_theirs = os.path.join(finetuned_uri, os.path.basename(theirs)) if finetuned_uri else theirs
        shown_ours = os.path.join(pretrained_uri, os.path.basename(ours)) if pretrained_uri else ours
        raise MismatchError(f"the tokenizer of {shown_theirs} differs from the pretrained model's "
                            f"{shown_ours} ({difference}): their token ids mean different things, so their "
                            "weights cannot be merged")
