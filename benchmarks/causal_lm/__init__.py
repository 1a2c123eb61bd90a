"""The causal-LM benchmark: a small Llama pretrained here from GLUE's text (``pretrain``), later fine-tuned on
GLUE tasks as generation and merged."""
