"""Adapting a model to a domain: LoRA (PEFT) and full fine-tuning in chains of stages.

`config` is FINETUNE.yaml; `data` turns documents or prompt/response pairs into masked token
windows; `setup` prepares a stage's run directory and lineage; `loop` trains it (one site or
several); `stage` reads any stage (Hugging Face directory, pre-training run, fine-tuning run)
and its lineage, and gives its weights with adapters merged; `lora` converts adapters to and
from PEFT's format on Hugging Face names; `merge` writes a stage as a plain Hugging Face model;
`text` is a stage's tokenizer and chat template. `commands` adds `atoll finetune`, `atoll
lineage` and `atoll merge`.
"""
