"""Training: `config` (TrainConfig), `resolve` (resolve_config), `step`, `loop` (fit), `rundir`,
`guard`, `distributed`.

Also `provenance` (determinism, what config.json records), `finetune`, `recipes` (the
shipped recipe files), `schedule`, `ema` and `tblog` (TensorBoard). Nothing is imported here
until used: `eanet.train.resolve_config(flags, config, out=...)` gives the (TrainConfig, run
directory, resume?) that `eanet.train.loop.fit(cfg, out, resume=resume)` trains, by the
rules of `eanet train`.
"""


def __getattr__(name: str) -> object:
    """`eanet.train.resolve_config`, imported on first use."""
    if name == "resolve_config":
        from eanet.train.resolve import resolve_config

        return resolve_config
    raise AttributeError(f"module 'eanet.train' has no attribute {name!r}")
