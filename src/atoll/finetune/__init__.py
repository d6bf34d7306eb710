"""Adapting a model to a domain: LoRA (PEFT) and full fine-tuning in chains of stages.

`config` is FINETUNE.yaml; `data` turns documents or prompt/response pairs into masked token
windows; `setup` prepares a stage's run directory and lineage; `trainer` trains it (one site
or several); `lora` wraps a model with PEFT adapters for training. What a stage's directory
holds (lineage, tokenizer and chat template, adapters in PEFT's format, merged weights) is
`atoll.rundir`'s; `atoll.export.merge_stage` writes a stage as a plain Hugging Face model.
`commands` adds `atoll finetune`, `atoll lineage` and `atoll merge`.
"""
