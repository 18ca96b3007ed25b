"""The training loop and its policy: optimizer, schedule and EMA, speed levers, numerical guards,
signals and preemption, preflight checks, which checkpoint to resume from, telemetry, and the
first stage (training the tiny preset's autoencoder).

May import every layer below it: `config`, `diffusion`, `storage`, `models`, `generate`, `data`,
`parallel`. Only the commands (`cli`, `export`, `evaluate`, `bench`) import it."""
