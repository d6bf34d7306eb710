"""A run directory: its layout, what it descends from, and loading what it holds.

`layout` names every file and folder of a run directory once (model.json, tokenizer.json,
config.yaml, lineage.json, adapter/, checkpoints/, sites/NAME, ...) and reads or writes its
small files; `tokenizer` is a stage's `TextTokenizer` (tokenizer, special ids, chat template);
`lineage` says what a directory is (Hugging Face, pre-training, full or LoRA stage), where it
came from and whether its parent still matches; `adapter` stores, reads and merges LoRA
adapters in PEFT's format; `load` gives any stage's weights, model and tokenizer.

Training, fine-tuning, serving, evaluation and export all use it; it imports none of them
except the checkpoint reader of `atoll.train.checkpoint` (which names its folder through
`layout`). Import the modules themselves: this package re-exports nothing, so `layout` can be
imported from below without pulling in the loaders.
"""
