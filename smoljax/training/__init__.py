"""Fine-tuning: loss, optimizer, train step, data, sharding, checkpoints, LoRA and the recipe runner.

Each piece is a small module usable on its own in a custom training loop; `smoljax.training.recipe` wires them
together for `smoljax train CONFIG.yaml`.
"""
