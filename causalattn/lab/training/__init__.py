"""`causalattn train`: causal adapter training end to end (see `causalattn.lab.training.command`).

Modules, one idea each: `config` (options), `tiny` (the embedded default base model), `batching`
(data and per-process micro-batches), `distributed` (torchrun, DDP/FSDP2), `loop` (the trainer),
`evaluate` (accuracy by candidate scoring), `checkpoint` (atomic, resumable), `report` (JSON + table),
`plots` (figures).
"""
