"""sslscale: self-supervised image pretraining (DISSL, CISSL; SimCLR and DINO baselines) at cluster scale."""

__version__ = "0.1.0"
