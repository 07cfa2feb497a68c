"""Optimizers (LARS, momentum SGD, fused Adam / AdamW) and the learning-rate schedule.

optimizers.py  the optimizers and parameter groups; steps skipped on the device
schedule.py    warm-up + cosine as a function of samples seen
"""
