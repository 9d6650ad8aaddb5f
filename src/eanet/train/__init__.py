"""Training: `config` (TrainConfig), `step`, `loop` (fit), `rundir`, `guard`, `distributed`.

Also `provenance` (determinism, what config.json records), `finetune`, `recipes` (the
shipped recipe files), `schedule`, `ema` and `tblog` (TensorBoard). Nothing is imported here.
"""
