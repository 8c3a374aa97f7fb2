"""Block-weighted merging (MBW) of SD1.x checkpoints: streaming engine, methods, presets, recipes,
runtime block merge and block diffs. Entry points: :func:`baka.merge.engine.merge_models`,
:class:`baka.merge.runtime.RuntimeBlockMerge`, :func:`baka.merge.diff.block_diff`."""
