"""LoRA tools on files: extract a LoRA from two checkpoints, bake LoRAs into a checkpoint, merge
LoRAs into one (``baka lora extract | bake | merge``)."""
