"""SimCLRv2 in PyTorch: contrastive pretraining, fine-tuning from the projection head, distillation."""

__version__ = "0.1.0"
