"""One trainer for full fine-tunes and LoRA: EveryDream2 text-encoder freezing, kohya network/rank/
module dropout, block-wise LR and dims, per-block dropout schedules, buckets, Danbooru captions,
min-SNR, v-pred / zero-terminal-SNR, EMA, validation, samples, exact resume, accelerate multi-process.
Entry point: :func:`baka.train.trainer.train`."""
