"""The fedadapt site: ClientApp glue over plain PyTorch training and evaluation."""
