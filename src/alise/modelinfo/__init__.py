"""What the model argument (a checkpoint directory or a preset name) says without loading
weights or importing torch: its config's fields, its tokenizer, its identity. The scheduler
and the HTTP door read the model through this alone; the worker builds on it."""
