"""Medical imaging data and backbones for fedadapt (MONAI transforms and networks, PEFT)."""
