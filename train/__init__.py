"""zip2zip training: LoRA + hyper-encoder fine-tuning jobs, from a CPU test to GPU servers."""
